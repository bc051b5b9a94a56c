//! The guest image (DescribeImages) and instances: RunInstances,
//! DescribeInstances, Stop/Start/TerminateInstances.

use std::collections::BTreeMap;

use crate::store::ids::new_id;
use crate::store::model::*;
use crate::store::State;

use super::common::*;
use super::driver::{Health, Job};
use super::eni::{self, build_eni, check_attach, EniSpec};
use super::pubip;
use super::query::Params;
use super::sg;
use super::vpc::fresh;
use super::xml::Xml;
use super::{Api, ApiError};

/// The one image: the guest built by images/build.sh.
pub const IMAGE_ID: &str = "ami-0e1ab000000000001";
pub const IMAGE_NAME: &str = "enilab-guest";
/// Most instances one RunInstances call may start.
pub const MAX_PER_CALL: i64 = 20;

pub fn describe_images(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "ImageId")?;
    let owners = list(p, "Owner")?;
    let fl = filters(
        p,
        &[
            "image-id",
            "name",
            "state",
            "architecture",
            "owner-id",
            "image-type",
            "is-public",
            "root-device-type",
            "virtualization-type",
        ],
    )?;
    let pg = page(p, !ids.is_empty())?;
    for id in &ids {
        AMI.check(id)?;
        if *id != IMAGE_ID {
            return Err(AMI.not_found(id));
        }
    }
    let owner = api.config.account_id.clone();
    let location = api
        .image_dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "images/out (not built)".to_string());
    let state = if api.image_dir.is_some() {
        "available"
    } else {
        "pending"
    };
    let owner_ok = owners.is_empty()
        || owners
            .iter()
            .any(|o| *o == "self" || *o == owner || *o == "amazon");
    let fields = |n: &str| -> Vec<String> {
        match n {
            "image-id" => vec![IMAGE_ID.into()],
            "name" => vec![IMAGE_NAME.into()],
            "state" => vec![state.into()],
            "architecture" => vec!["x86_64".into()],
            "owner-id" => vec![owner.clone()],
            "image-type" => vec!["machine".into()],
            "is-public" => vec!["false".into()],
            "root-device-type" => vec!["instance-store".into()],
            "virtualization-type" => vec!["hvm".into()],
            _ => vec![],
        }
    };
    let show = owner_ok && filter_match(&fl, &Tags::new(), fields);
    let items: Vec<&str> = if show { vec![IMAGE_ID] } else { vec![] };
    let (items, token) = paginate(items, |s| s, &pg);
    let mut x = Xml::new();
    x.set("imagesSet", items, |x, id| {
        x.text("imageId", id)
            .text("imageLocation", &location)
            .text("imageState", state)
            .text("imageOwnerId", &owner)
            .text("creationDate", "2024-01-01T00:00:00.000Z")
            .bool("isPublic", false)
            .text("architecture", "x86_64")
            .text("imageType", "machine")
            .text("name", IMAGE_NAME)
            .text(
                "description",
                "enilab guest: Linux kernel + initramfs with the enilab agent",
            )
            .text("rootDeviceType", "instance-store")
            .text("virtualizationType", "hvm")
            .text("hypervisor", "xen")
            .bool("enaSupport", true)
            .text("platformDetails", "Linux/UNIX")
            .text("bootMode", "uefi-preferred");
    });
    x.opt("nextToken", token.as_deref());
    Ok(x.finish())
}

/// The interfaces of an instance, ordered by card then device.
pub fn instance_enis<'a>(st: &'a State, id: &str) -> Vec<&'a Eni> {
    let mut v: Vec<&Eni> = st
        .iter::<Eni>()
        .filter(|e| e.attachment.as_ref().is_some_and(|a| a.instance_id == id))
        .collect();
    v.sort_by_key(|e| {
        e.attachment
            .as_ref()
            .map(|a| (a.card_index, a.device_index))
    });
    v
}

fn primary_eni<'a>(st: &'a State, id: &str) -> Option<&'a Eni> {
    instance_enis(st, id).into_iter().find(|e| {
        e.attachment
            .as_ref()
            .is_some_and(|a| a.card_index == 0 && a.device_index == 0)
    })
}

fn write_state(x: &mut Xml, name: &str, s: InstanceState) {
    x.elem(name, |x| {
        x.num("code", s.code()).text("name", s.name());
    });
}

fn write_instance(x: &mut Xml, st: &State, i: &Instance, owner: &str) {
    let enis = instance_enis(st, &i.id);
    let primary = primary_eni(st, &i.id);
    let ty = &i.instance_type;
    x.text("instanceId", &i.id).text("imageId", &i.image_id);
    write_state(x, "instanceState", i.state);
    x.text(
        "privateDnsName",
        &primary
            .map(|e| eni::dns_name(e.primary_ip()))
            .unwrap_or_default(),
    )
    .text("dnsName", "")
    .text("reason", &i.transition_reason)
    .opt("keyName", i.key_name.as_deref())
    .num("amiLaunchIndex", i.launch_index)
    .set("productCodes", std::iter::empty::<()>(), |_, _| {})
    .text("instanceType", ty)
    .text("launchTime", &iso8601(i.launch_time))
    .elem("placement", |x| {
        x.text("availabilityZone", &i.az)
            .text("groupName", "")
            .text("tenancy", "default");
    })
    .elem("monitoring", |x| {
        x.text("state", "disabled");
    })
    .text("subnetId", &i.subnet_id)
    .text("vpcId", &i.vpc_id);
    if let Some(e) = primary {
        x.text("privateIpAddress", e.primary_ip());
        if let Some(ip) = pubip::public_ip_of(st, e, e.primary_ip()) {
            x.text("ipAddress", &ip);
        }
        x.bool("sourceDestCheck", e.source_dest_check);
        x.set("groupSet", &e.groups, |x, g| {
            x.text("groupId", g);
            if let Some(s) = st.get::<SecurityGroup>(g) {
                x.text("groupName", &s.name);
            }
        });
    } else {
        x.set("groupSet", std::iter::empty::<()>(), |_, _| {});
    }
    if let Some((code, msg)) = &i.state_reason {
        x.elem("stateReason", |x| {
            x.text("code", code).text("message", msg);
        });
    }
    x.text("architecture", "x86_64")
        .text("rootDeviceType", "instance-store")
        .set("blockDeviceMapping", std::iter::empty::<()>(), |_, _| {})
        .text("virtualizationType", "hvm")
        .opt("clientToken", i.client_token.as_deref())
        .tags(&i.tags)
        .text("hypervisor", "xen")
        .set("networkInterfaceSet", enis, |x, e| {
            eni::write_eni(x, st, e, owner, true)
        })
        .bool("ebsOptimized", false)
        .bool("enaSupport", true);
}

fn write_reservations(x: &mut Xml, st: &State, insts: &[&Instance], owner: &str) {
    // Keep the instances' order; one reservation item per run of the same reservation.
    let mut groups: Vec<(&str, Vec<&Instance>)> = Vec::new();
    for i in insts {
        match groups.iter_mut().find(|g| g.0 == i.reservation_id) {
            Some(g) => g.1.push(i),
            None => groups.push((&i.reservation_id, vec![i])),
        }
    }
    x.set("reservationSet", groups, |x, (rid, is)| {
        x.text("reservationId", rid).text("ownerId", owner);
        x.set("groupSet", std::iter::empty::<()>(), |_, _| {});
        x.set("instancesSet", is, |x, i| write_instance(x, st, i, owner));
    });
}

/// One `NetworkInterface.N` of RunInstances.
struct NicRequest {
    device: u32,
    card: u32,
    existing: Option<String>,
    subnet: Option<String>,
    spec: EniSpec,
    delete_on_termination: Option<bool>,
    queues: Option<u32>,
    /// AssociatePublicIpAddress: overrides the subnet's MapPublicIpOnLaunch.
    public_ip: Option<bool>,
}

fn nic_requests(p: &Params, max_queues: u32) -> Result<Vec<NicRequest>, ApiError> {
    let mut out = Vec::new();
    let nics = p.structs("NetworkInterface");
    if nics.is_empty() {
        let subnet = p.get("SubnetId").map(String::from);
        let mut spec = EniSpec {
            primary_ip: p.get("PrivateIpAddress").map(String::from),
            groups: list(p, "SecurityGroupId")?
                .into_iter()
                .map(String::from)
                .collect(),
            ..Default::default()
        };
        spec.description = String::new();
        out.push(NicRequest {
            device: 0,
            card: 0,
            existing: None,
            subnet,
            spec,
            delete_on_termination: Some(true),
            queues: None,
            public_ip: None,
        });
        return Ok(out);
    }
    if p.contains("SubnetId") || p.has_prefix("SecurityGroupId") || p.contains("PrivateIpAddress") {
        return Err(ApiError::combination(
            "Network interfaces and an instance-level subnet ID, security groups or private IP address may not be specified on the same request".to_string(),
        ));
    }
    for n in nics {
        let device = req_int_in(&n, "DeviceIndex", 0, 127)? as u32;
        let card = opt_int_in(&n, "NetworkCardIndex", 0, 63)?.unwrap_or(0) as u32;
        let public_ip = opt_bool(&n, "AssociatePublicIpAddress")?;
        let queues = match opt_int(&n, "EnaQueueCount")? {
            None => None,
            Some(q) if q >= 1 && q <= i64::from(max_queues) => Some(q as u32),
            Some(q) => {
                return Err(ApiError::invalid(format!(
                    "Invalid value '{q}' for EnaQueueCount: it must be between 1 and {max_queues}."
                )))
            }
        };
        let mut spec = EniSpec {
            description: n.get("Description").unwrap_or("").to_string(),
            primary_ip: n.get("PrivateIpAddress").map(String::from),
            secondary_count: opt_int_in(&n, "SecondaryPrivateIpAddressCount", 1, 49)?.unwrap_or(0)
                as u32,
            groups: list(&n, "SecurityGroupId")?
                .into_iter()
                .map(String::from)
                .collect(),
            prefixes: n
                .structs("Ipv4Prefix")
                .iter()
                .filter_map(|s| s.get("Ipv4Prefix").map(String::from))
                .collect(),
            prefix_count: opt_int_in(&n, "Ipv4PrefixCount", 1, 49)?.unwrap_or(0) as u32,
            ..Default::default()
        };
        for s in n.structs("PrivateIpAddresses") {
            let ip = s
                .get("PrivateIpAddress")
                .ok_or_else(|| ApiError::missing("PrivateIpAddresses.N.PrivateIpAddress"))?;
            if opt_bool(&s, "Primary")?.unwrap_or(false) {
                spec.primary_ip = Some(ip.to_string());
            } else {
                spec.secondary_ips.push(ip.to_string());
            }
        }
        let existing = n.get("NetworkInterfaceId").map(String::from);
        let subnet = n.get("SubnetId").map(String::from);
        if existing.is_some() == subnet.is_some() {
            return Err(ApiError::combination(
                "Each network interface needs exactly one of NetworkInterfaceId and SubnetId"
                    .to_string(),
            ));
        }
        out.push(NicRequest {
            device,
            card,
            existing,
            subnet,
            spec,
            delete_on_termination: opt_bool(&n, "DeleteOnTermination")?,
            queues,
            public_ip,
        });
    }
    // AWS's rules for AssociatePublicIpAddress.
    let several = out.len() > 1;
    for r in out.iter().filter(|r| r.public_ip.is_some()) {
        if r.device != 0 || r.card != 0 {
            return Err(ApiError::combination(
                "The associatePublicIPAddress parameter can only be specified for the network interface with DeviceIndex 0.".to_string(),
            ));
        }
        if r.existing.is_some() {
            return Err(ApiError::combination(
                "The associatePublicIPAddress parameter cannot be specified for a network interface with an ID.".to_string(),
            ));
        }
        if several && r.public_ip == Some(true) {
            return Err(ApiError::combination(
                "The associatePublicIPAddress parameter cannot be specified when launching with multiple network interfaces.".to_string(),
            ));
        }
    }
    if !out.iter().any(|n| n.device == 0 && n.card == 0) {
        return Err(ApiError::invalid(
            "Each instance must have a network interface at device index 0 on network card 0."
                .to_string(),
        ));
    }
    Ok(out)
}

pub fn run_instances(api: &Api, p: &Params) -> Result<String, ApiError> {
    let image = req(p, "ImageId")?;
    AMI.check(image)?;
    if image != IMAGE_ID {
        return Err(AMI.not_found(image));
    }
    let ty_name = p.get("InstanceType").unwrap_or("t3.micro");
    let ty = api
        .config
        .types
        .get(ty_name)
        .ok_or_else(|| ApiError::invalid(format!("Invalid value '{ty_name}' for InstanceType.")))?
        .clone();
    let min = req_int_in(p, "MinCount", 1, i64::from(u32::MAX))?;
    let max = req_int_in(p, "MaxCount", 1, i64::from(u32::MAX))?;
    if min > max {
        return Err(ApiError::invalid(format!(
            "MinCount ({min}) must not be greater than MaxCount ({max})."
        )));
    }
    if min > MAX_PER_CALL {
        return Err(ApiError::new(
            "InstanceLimitExceeded",
            format!("You have requested more instances ({min}) than enilab starts in one call ({MAX_PER_CALL})."),
        ));
    }
    let count = max.min(MAX_PER_CALL) as u32;
    if p.has_prefix("SecurityGroup") && !p.has_prefix("SecurityGroupId") {
        return Err(ApiError::invalid(
            "Use SecurityGroupId; group names are only for EC2-Classic and default VPCs."
                .to_string(),
        ));
    }
    let nics = nic_requests(p, ty.max_queues())?;
    if nics
        .iter()
        .all(|n| n.existing.is_none() && n.subnet.is_none())
    {
        return Err(ApiError::new(
            "VPCIdNotSpecified",
            "No default VPC for this user. Specify SubnetId or NetworkInterface.".to_string(),
        ));
    }
    if count > 1
        && nics.iter().any(|n| {
            n.existing.is_some()
                || n.spec.primary_ip.is_some()
                || !n.spec.secondary_ips.is_empty()
                || !n.spec.prefixes.is_empty()
        })
    {
        return Err(ApiError::invalid(
            "Existing network interfaces and explicit addresses can only be used when launching one instance.".to_string(),
        ));
    }
    let az_wanted = p.get("Placement.AvailabilityZone");
    let inst_tags = tag_spec(p, "instance", &["instance", "network-interface", "volume"])?;
    let eni_tags = tag_spec(
        p,
        "network-interface",
        &["instance", "network-interface", "volume"],
    )?;
    let token = p
        .get("ClientToken")
        .filter(|t| !t.is_empty())
        .map(String::from);
    let key_name = p.get("KeyName").map(String::from);
    let user_data = p.get("UserData").map(String::from);
    let cfg = &api.config;
    let owner = &cfg.account_id;
    let single_nic = nics.len() == 1;

    // Idempotency: the same ClientToken returns the first call's instances.
    if let Some(tok) = &token {
        let found = api.store.read(|st| {
            let insts: Vec<&Instance> = st
                .iter::<Instance>()
                .filter(|i| i.client_token.as_ref() == Some(tok))
                .collect();
            (!insts.is_empty()).then(|| {
                let mut x = Xml::new();
                x.text("reservationId", &insts[0].reservation_id)
                    .text("ownerId", owner);
                x.set("groupSet", std::iter::empty::<()>(), |_, _| {});
                x.set("instancesSet", insts, |x, i| {
                    write_instance(x, st, i, owner)
                });
                x.finish()
            })
        });
        if let Some(xml) = found {
            return Ok(xml);
        }
    }

    let ids = api.store.write(|t| {
        let reservation = new_id("r-");
        let mut ids = Vec::new();
        for n in 0..count {
            let id = fresh(t, "i-");
            let mut inst = Instance {
                id: id.clone(),
                reservation_id: reservation.clone(),
                image_id: IMAGE_ID.to_string(),
                instance_type: ty_name.to_string(),
                state: InstanceState::Pending,
                state_reason: Some(("pending".into(), "pending".into())),
                transition_reason: String::new(),
                subnet_id: String::new(),
                vpc_id: String::new(),
                az: String::new(),
                launch_time: now_ms(),
                launch_index: n,
                key_name: key_name.clone(),
                client_token: token.clone(),
                user_data: user_data.clone(),
                tags: inst_tags.clone(),
            };
            // The primary interface first: it places the instance.
            let mut order: Vec<&NicRequest> = nics.iter().collect();
            order.sort_by_key(|r| (r.card, r.device));
            for r in order {
                let (mut e, dot) = match (&r.existing, &r.subnet) {
                    (Some(eid), _) => {
                        let e = ENI.get::<Eni>(t, eid)?.clone();
                        if e.attachment.is_some() {
                            return Err(ApiError::new(
                                "InvalidNetworkInterface.InUse",
                                format!("Interface: [{eid}] in use."),
                            ));
                        }
                        (e, r.delete_on_termination.unwrap_or(false))
                    }
                    (None, Some(sid)) => {
                        let subnet = SUBNET.get::<Subnet>(t, sid)?.clone();
                        let mut spec = r.spec.clone();
                        spec.tags = eni_tags.clone();
                        if !spec.groups.is_empty() {
                            let g: Vec<&str> = spec.groups.iter().map(|s| s.as_str()).collect();
                            sg::check_groups(t, &g, &subnet.vpc_id)?;
                        }
                        let e = build_eni(t, &subnet, &spec, ty.ipv4_per_eni)?;
                        (e, r.delete_on_termination.unwrap_or(true))
                    }
                    (None, None) => return Err(ApiError::missing("SubnetId")),
                };
                if r.device == 0 && r.card == 0 {
                    if let Some(z) = az_wanted {
                        if z != e.az {
                            return Err(ApiError::combination(format!(
                                "The availability zone {z} does not match the subnet's zone {}.",
                                e.az
                            )));
                        }
                    }
                    inst.subnet_id = e.subnet_id.clone();
                    inst.vpc_id = e.vpc_id.clone();
                    inst.az = e.az.clone();
                    // A public IPv4 address only for a new primary interface
                    // of a single-interface launch; the request's
                    // AssociatePublicIpAddress overrides the subnet.
                    if r.existing.is_none() && single_nic {
                        let map = t
                            .get::<Subnet>(&e.subnet_id)
                            .is_some_and(|s| s.map_public_ip_on_launch);
                        e.auto_public_ip = r.public_ip.unwrap_or(map);
                    }
                }
                // Interfaces placed earlier in this loop are already in the state.
                check_attach(t, cfg, &inst, &e, r.device, r.card, &[])?;
                e.attachment = Some(Attachment {
                    id: new_id("eni-attach-"),
                    instance_id: id.clone(),
                    device_index: r.device,
                    card_index: r.card,
                    status: AttachmentStatus::Attached,
                    attach_time: inst.launch_time,
                    delete_on_termination: dot,
                    ena_queue_count: r.queues,
                    force_detach: false,
                });
                // Put it now so the next interface's addresses avoid it.
                t.put(e);
            }
            t.put(inst);
            pubip::sync_instance(t, Some(cfg.public_pool), &id)?;
            ids.push(id);
        }
        Ok(ids)
    })?;
    // Answer with the committed `pending` state, then start the jobs.
    let xml = api.store.read(|st| {
        let insts: Vec<&Instance> = ids.iter().filter_map(|i| st.get::<Instance>(i)).collect();
        let mut x = Xml::new();
        x.text(
            "reservationId",
            insts
                .first()
                .map(|i| i.reservation_id.as_str())
                .unwrap_or(""),
        )
        .text("ownerId", owner);
        x.set("groupSet", std::iter::empty::<()>(), |_, _| {});
        x.set("instancesSet", insts, |x, i| {
            write_instance(x, st, i, owner)
        });
        x.finish()
    });
    for id in &ids {
        api.jobs.push(Job::Launch(id.clone()));
    }
    Ok(xml)
}

const INSTANCE_FILTERS: &[&str] = &[
    "instance-id",
    "instance-state-name",
    "instance-state-code",
    "instance-type",
    "image-id",
    "subnet-id",
    "vpc-id",
    "availability-zone",
    "private-ip-address",
    "ip-address",
    "reservation-id",
    "key-name",
    "client-token",
    "owner-id",
    "group-id",
    "instance.group-id",
    "group-name",
    "instance.group-name",
    "network-interface.network-interface-id",
    "network-interface.subnet-id",
    "network-interface.vpc-id",
    "network-interface.addresses.private-ip-address",
    "network-interface.attachment.device-index",
    "network-interface.attachment.network-card-index",
];

fn instance_field(st: &State, i: &Instance, n: &str, owner: &str) -> Vec<String> {
    let enis = instance_enis(st, &i.id);
    let primary = primary_eni(st, &i.id);
    let groups = || primary.map(|e| e.groups.clone()).unwrap_or_default();
    match n {
        "instance-id" => vec![i.id.clone()],
        "instance-state-name" => vec![i.state.name().into()],
        "instance-state-code" => vec![i.state.code().to_string()],
        "instance-type" => vec![i.instance_type.clone()],
        "image-id" => vec![i.image_id.clone()],
        "subnet-id" => vec![i.subnet_id.clone()],
        "vpc-id" => vec![i.vpc_id.clone()],
        "availability-zone" => vec![i.az.clone()],
        "private-ip-address" => primary
            .map(|e| e.primary_ip().to_string())
            .into_iter()
            .collect(),
        "ip-address" => primary
            .and_then(|e| pubip::public_ip_of(st, e, e.primary_ip()))
            .into_iter()
            .collect(),
        "reservation-id" => vec![i.reservation_id.clone()],
        "key-name" => i.key_name.clone().into_iter().collect(),
        "client-token" => i.client_token.clone().into_iter().collect(),
        "owner-id" => vec![owner.to_string()],
        "group-id" | "instance.group-id" => groups(),
        "group-name" | "instance.group-name" => groups()
            .iter()
            .filter_map(|g| st.get::<SecurityGroup>(g).map(|s| s.name.clone()))
            .collect(),
        "network-interface.network-interface-id" => enis.iter().map(|e| e.id.clone()).collect(),
        "network-interface.subnet-id" => enis.iter().map(|e| e.subnet_id.clone()).collect(),
        "network-interface.vpc-id" => enis.iter().map(|e| e.vpc_id.clone()).collect(),
        "network-interface.addresses.private-ip-address" => enis
            .iter()
            .flat_map(|e| e.private_ips.iter().map(|p| p.ip.clone()))
            .collect(),
        "network-interface.attachment.device-index" => enis
            .iter()
            .filter_map(|e| e.attachment.as_ref().map(|a| a.device_index.to_string()))
            .collect(),
        "network-interface.attachment.network-card-index" => enis
            .iter()
            .filter_map(|e| e.attachment.as_ref().map(|a| a.card_index.to_string()))
            .collect(),
        _ => vec![],
    }
}

pub fn describe_instances(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "InstanceId")?;
    let fl = filters(p, INSTANCE_FILTERS)?;
    let pg = page(p, !ids.is_empty())?;
    let owner = &api.config.account_id;
    api.store.read(|st| {
        let sel: Vec<&Instance> = INSTANCE
            .get_many::<Instance>(st, &ids)?
            .into_iter()
            .filter(|i| filter_match(&fl, &i.tags, |n| instance_field(st, i, n, owner)))
            .collect();
        let (sel, token) = paginate(sel, |i| &i.id, &pg);
        let mut x = Xml::new();
        write_reservations(&mut x, st, &sel, owner);
        x.opt("nextToken", token.as_deref());
        Ok(x.finish())
    })
}

/// `DescribeInstanceStatus`: InstanceId.N, IncludeAllInstances. The
/// status checks are live, from the driver's health of each guest: the
/// instance check is `ok` while the agent's heartbeat is fresh,
/// `initializing` before the first one and `impaired` (reachability
/// `failed`) when the guest is hung or gone; the system check is
/// `impaired` when the instance's QEMU is not running. Instances that are
/// not running are listed only with IncludeAllInstances=true, with
/// `not-applicable` checks.
pub fn describe_instance_status(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "InstanceId")?;
    let all = opt_bool(p, "IncludeAllInstances")?.unwrap_or(false);
    api.store.read(|st| {
        let sel: Vec<&Instance> = INSTANCE
            .get_many::<Instance>(st, &ids)?
            .into_iter()
            .filter(|i| all || i.state == InstanceState::Running)
            .collect();
        let mut x = Xml::new();
        x.set("instanceStatusSet", sel, |x, i| {
            x.text("instanceId", &i.id).text("availabilityZone", &i.az);
            write_state(x, "instanceState", i.state);
            let (system, instance) = if i.state == InstanceState::Running {
                let system = if api.driver.is_running(i) {
                    "ok"
                } else {
                    "impaired"
                };
                let instance = match api.driver.health(i) {
                    Health::Healthy => "ok",
                    Health::Unknown => "initializing",
                    Health::Failed(_) => "impaired",
                };
                (system, instance)
            } else {
                ("not-applicable", "not-applicable")
            };
            write_check(x, "systemStatus", system);
            write_check(x, "instanceStatus", instance);
        });
        Ok(x.finish())
    })
}

/// A status check: its summary and its one detail (reachability).
fn write_check(x: &mut Xml, name: &str, status: &str) {
    let detail = match status {
        "ok" => "passed",
        "impaired" => "failed",
        "initializing" => "initializing",
        _ => "insufficient-data",
    };
    x.elem(name, |x| {
        x.text("status", status);
        x.set("details", [detail], |x, d| {
            x.text("name", "reachability").text("status", d);
        });
    });
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Stop,
    Start,
    Terminate,
}

fn change_state(api: &Api, p: &Params, change: Change) -> Result<String, ApiError> {
    let ids = list(p, "InstanceId")?;
    if ids.is_empty() {
        return Err(ApiError::missing("InstanceId"));
    }
    let (rows, jobs) = api.store.write(|t| {
        let mut rows = Vec::new();
        let mut jobs = Vec::new();
        let mut seen = BTreeMap::new();
        for id in &ids {
            let mut inst = INSTANCE.get::<Instance>(t, id)?.clone();
            if seen.insert(inst.id.clone(), ()).is_some() {
                continue;
            }
            let prev = inst.state;
            use InstanceState::*;
            let bad = || {
                ApiError::new(
                    "IncorrectInstanceState",
                    format!(
                        "The instance '{id}' is not in a state from which it can be {}.",
                        match change {
                            Change::Stop => "stopped",
                            Change::Start => "started",
                            Change::Terminate => "terminated",
                        }
                    ),
                )
            };
            let next = match (change, prev) {
                (Change::Stop, Pending | Running) => Some(Stopping),
                (Change::Stop, Stopping | Stopped) => None,
                (Change::Stop, _) => return Err(bad()),
                (Change::Start, Stopped) => Some(Pending),
                (Change::Start, Pending | Running) => None,
                (Change::Start, _) => return Err(bad()),
                (Change::Terminate, Terminated | ShuttingDown) => None,
                (Change::Terminate, _) => Some(ShuttingDown),
            };
            if let Some(n) = next {
                inst.state = n;
                let reason = match change {
                    Change::Stop => "User initiated",
                    Change::Start => "",
                    Change::Terminate => "User initiated",
                };
                inst.transition_reason = if reason.is_empty() {
                    String::new()
                } else {
                    format!("{reason} ({})", iso8601(now_ms()))
                };
                inst.state_reason = match change {
                    Change::Start => Some(("pending".into(), "pending".into())),
                    _ => Some((
                        "Client.UserInitiatedShutdown".into(),
                        "Client.UserInitiatedShutdown: User initiated shutdown".into(),
                    )),
                };
                jobs.push(match change {
                    Change::Stop => Job::Stop(inst.id.clone()),
                    Change::Start => Job::Start(inst.id.clone()),
                    Change::Terminate => Job::Terminate(inst.id.clone()),
                });
                rows.push((inst.id.clone(), prev, n));
                let iid = inst.id.clone();
                t.put(inst);
                // Stop and terminate release the launch public IP; start
                // hands out a new one.
                pubip::sync_instance(t, Some(api.config.public_pool), &iid)?;
            } else {
                rows.push((inst.id.clone(), prev, prev));
            }
        }
        Ok((rows, jobs))
    })?;
    for j in jobs {
        api.jobs.push(j);
    }
    let mut x = Xml::new();
    x.set("instancesSet", rows, |x, (id, prev, cur)| {
        x.text("instanceId", &id);
        write_state(x, "currentState", cur);
        write_state(x, "previousState", prev);
    });
    Ok(x.finish())
}

pub fn stop_instances(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_state(api, p, Change::Stop)
}
pub fn start_instances(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_state(api, p, Change::Start)
}
pub fn terminate_instances(api: &Api, p: &Params) -> Result<String, ApiError> {
    change_state(api, p, Change::Terminate)
}
