//! Public IPv4 addresses assigned at launch (AWS's "auto-assigned public
//! IP"), as opposed to Elastic IPs.
//!
//! The address comes from the same pool as AllocateAddress but is not an
//! allocation: it lives on the primary interface ([`Eni::public_ip`]), and
//! the interface remembers that it was launched with one
//! ([`Eni::auto_public_ip`]). As in AWS:
//!
//! * RunInstances assigns one to a *new* primary interface when the subnet's
//!   MapPublicIpOnLaunch is true or `NetworkInterface.N.AssociatePublicIpAddress`
//!   asks for it (which overrides the subnet), and only when the instance
//!   is launched with one interface.
//! * Stop and terminate release it; start gives a new one (unless the
//!   instance now has more than one interface).
//! * Associating an Elastic IP with the primary private address releases it;
//!   disassociating gives a new one.
//!
//! [`sync_instance`] brings an instance's interfaces in line with these
//! rules; every place that changes an instance's state or an Elastic IP
//! association calls it inside the same transaction, so the address is as
//! durable as the rest of the state.

use std::collections::BTreeSet;

use crate::store::model::*;
use crate::store::net::{self, Cidr};
use crate::store::{State, Txn};

use super::eni::eip_on;
use super::instance::instance_enis;
use super::ApiError;

/// Every pool address in use: allocated Elastic IPs and launch public IPs.
pub fn used_public(st: &State) -> BTreeSet<u32> {
    st.iter::<Address>()
        .filter_map(|a| net::parse_ip(&a.public_ip))
        .chain(
            st.iter::<Eni>()
                .filter_map(|e| e.public_ip.as_deref().and_then(net::parse_ip)),
        )
        .collect()
}

/// The lowest free pool address. The pool's network and broadcast
/// addresses are never handed out, nor its first host: that is the
/// internet namespace's own address (the lab's "internet host").
pub fn free_public(st: &State, pool: Cidr) -> Result<u32, ApiError> {
    let used = used_public(st);
    (pool.network().saturating_add(2)..pool.last())
        .find(|ip| !used.contains(ip))
        .ok_or_else(|| {
            ApiError::new(
                "AddressLimitExceeded",
                format!("The public address pool {pool} has no free address."),
            )
        })
}

fn active(st: &State, instance: &str) -> bool {
    st.get::<Instance>(instance)
        .is_some_and(|i| matches!(i.state, InstanceState::Pending | InstanceState::Running))
}

/// Make the launch public IPs of `instance`'s interfaces match its state.
/// With `pool` None only releases happen (callers that must not fail).
/// An interface keeps or gets an address when it was launched with one, its
/// instance is pending or running and no Elastic IP is on its primary
/// private address; a new address is only handed out while the instance has
/// a single interface.
pub fn sync_instance(t: &mut Txn<'_>, pool: Option<Cidr>, instance: &str) -> Result<(), ApiError> {
    let enis: Vec<Eni> = instance_enis(t, instance).into_iter().cloned().collect();
    let single = enis.len() == 1;
    let on = active(t, instance);
    for mut e in enis {
        let wanted = e.auto_public_ip && on && eip_on(t, &e.id, e.primary_ip()).is_none();
        match (&e.public_ip, wanted) {
            (Some(_), false) => {
                e.public_ip = None;
                t.put(e);
            }
            (None, true) if single => {
                if let Some(pool) = pool {
                    let ip = free_public(t, pool)?;
                    e.public_ip = Some(net::ip_string(ip));
                    t.put(e);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// [`sync_instance`] for the instance `eni` is attached to; an unattached
/// interface loses its launch address.
pub fn sync_eni(t: &mut Txn<'_>, pool: Option<Cidr>, eni: &str) -> Result<(), ApiError> {
    let Some(e) = t.get::<Eni>(eni).cloned() else {
        return Ok(());
    };
    match &e.attachment {
        Some(a) => {
            let inst = a.instance_id.clone();
            sync_instance(t, pool, &inst)
        }
        None => {
            if e.public_ip.is_some() || e.auto_public_ip {
                let mut e = e;
                e.public_ip = None;
                e.auto_public_ip = false;
                t.put(e);
            }
            Ok(())
        }
    }
}

/// The public address shown for (eni, private ip): its Elastic IP, or the
/// launch public IP on the primary address.
pub fn public_ip_of(st: &State, e: &Eni, ip: &str) -> Option<String> {
    if let Some(a) = eip_on(st, &e.id, ip) {
        return Some(a.public_ip.clone());
    }
    if ip == e.primary_ip() {
        return e.public_ip.clone();
    }
    None
}
