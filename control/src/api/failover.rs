//! ENI failover (enilab actions, not EC2): move an ENI from a failed
//! instance to a hot standby, by hand (`FailoverNetworkInterface`) or by
//! policy (a failover group: an ENI and an ordered list of standbys, which
//! the [`Detector`] watches).
//!
//! A move is: force-detach from the current instance (the device goes at
//! once, the unplug finishes in the background), then attach to the first
//! standby that is running, healthy, in the ENI's VPC and AZ and has room,
//! at the same device/card index when free. The driver calls happen on the
//! caller's thread, in order, with nothing locked; each step is committed.
//! A standby that does not qualify is an error that names why, and the ENI
//! is then attached nowhere (never half-attached). See `docs/failover.md`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::store::model::*;
use crate::store::{State, Txn};

use super::common::*;
use super::driver::Health;
use super::eni::{check_attach, instance_type};
use super::query::Params;
use super::vpc::fresh;
use super::xml::Xml;
use super::{Api, ApiError};

/// How often the detector looks.
pub const DETECT_INTERVAL: Duration = Duration::from_millis(100);
/// How often a group whose ENI is attached nowhere tries its standbys again.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Standbys per group.
pub const MAX_STANDBYS: usize = 16;

/// Failover group IDs.
pub const GROUP: IdKind = IdKind {
    prefix: "efg-",
    malformed: "InvalidFailoverGroupId.Malformed",
    not_found: "InvalidFailoverGroupId.NotFound",
    noun: "failover group",
};

/// What one move did.
#[derive(Debug, Clone)]
pub struct Moved {
    pub from: Option<String>,
    pub to: String,
    pub attachment: String,
    pub elapsed: Duration,
}

/// Why `inst` cannot take `eni` now; `None` if it can (at the returned
/// device, card).
fn qualify(
    api: &Api,
    st: &State,
    eni: &Eni,
    inst_id: &str,
    want: (u32, u32),
) -> Result<(u32, u32), String> {
    let Some(inst) = st.get::<Instance>(inst_id) else {
        return Err(format!("{inst_id} does not exist"));
    };
    if eni.vpc_id != inst.vpc_id {
        return Err(format!(
            "{inst_id} is in {}, the interface in {}",
            inst.vpc_id, eni.vpc_id
        ));
    }
    if inst.state != InstanceState::Running {
        return Err(format!("{inst_id} is {}, not running", inst.state.name()));
    }
    match api.driver.health(inst) {
        Health::Healthy => {}
        Health::Unknown => return Err(format!("{inst_id} has not reported healthy yet")),
        Health::Failed(why) => return Err(format!("{inst_id} is down ({why})")),
    }
    let cfg = &api.config;
    let ty = instance_type(cfg, inst).map_err(|e| e.message())?;
    // The same slot when free, else the lowest free device on that card,
    // else on any card.
    let mut candidates = vec![want];
    for card in std::iter::once(want.1).chain(0..ty.cards) {
        for dev in 1..ty.enis.max(1) + 1 {
            candidates.push((dev, card));
        }
    }
    let mut last = String::new();
    for (dev, card) in candidates {
        match check_attach(st, cfg, inst, eni, dev, card, &[]) {
            Ok(()) => return Ok((dev, card)),
            Err(e) => {
                if e.code() == "AttachmentLimitExceeded"
                    || e.code() == "InvalidParameterCombination"
                    || e.code() == "PrivateIpAddressLimitExceeded"
                {
                    return Err(format!("{inst_id}: {}", e.message()));
                }
                last = e.message();
            }
        }
    }
    Err(format!("{inst_id}: {last}"))
}

/// Move `eni_id` to the first qualifying instance of `standbys` (the one
/// holding it now is skipped). On any refusal the ENI ends up detached.
pub fn move_eni(api: &Api, eni_id: &str, standbys: &[String]) -> Result<Moved, ApiError> {
    let t0 = Instant::now();
    // 1. Detach (forced) from wherever it is.
    let current = api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, eni_id)?.clone();
        let Some(a) = eni.attachment.as_mut() else {
            return Ok(None);
        };
        if a.device_index == 0 && a.card_index == 0 {
            return Err(ApiError::new(
                "OperationNotPermitted",
                "The network interface at device index 0 and networkCard index 0 cannot be moved."
                    .to_string(),
            ));
        }
        a.status = AttachmentStatus::Detaching;
        a.force_detach = true;
        let slot = (a.device_index, a.card_index);
        let inst = a.instance_id.clone();
        t.put(eni.clone());
        Ok::<_, ApiError>(Some((inst, slot, eni)))
    })?;
    let (from, slot) = match current {
        Some((inst_id, slot, eni)) => {
            let inst = api.store.read(|st| st.get::<Instance>(&inst_id).cloned());
            if let Some(inst) = inst {
                if let Err(e) = api.driver.detach(&inst, &eni, true) {
                    tracing::warn!(eni = eni_id, "forced detach: {e}; detached anyway");
                }
            }
            api.store.write(|t| {
                if let Some(mut e) = t.get::<Eni>(eni_id).cloned() {
                    if e.attachment
                        .as_ref()
                        .is_some_and(|a| a.instance_id == inst_id)
                    {
                        e.attachment = None;
                        t.put(e);
                    }
                }
                Ok::<_, ApiError>(())
            })?;
            (Some(inst_id), slot)
        }
        None => (None, (1, 0)),
    };
    // 2. Choose and record the standby.
    let (to, eni) = api.store.write(|t| {
        let mut eni = ENI.get::<Eni>(t, eni_id)?.clone();
        if let Some(a) = &eni.attachment {
            return Err(ApiError::new(
                "InvalidNetworkInterface.InUse",
                format!(
                    "Interface {eni_id} was attached to {} meanwhile.",
                    a.instance_id
                ),
            ));
        }
        let mut why = Vec::new();
        let mut chosen = None;
        for s in standbys.iter().filter(|s| Some(*s) != from.as_ref()) {
            match qualify(api, t, &eni, s, slot) {
                Ok(place) => {
                    chosen = Some((s.clone(), place));
                    break;
                }
                Err(w) => why.push(w),
            }
        }
        let Some((to, (device, card))) = chosen else {
            return Err(ApiError::new(
                "NoHealthyStandby",
                format!(
                    "No standby can take {eni_id}; it is attached nowhere. {}",
                    if why.is_empty() {
                        "No standby was given.".to_string()
                    } else {
                        why.join("; ")
                    }
                ),
            ));
        };
        eni.attachment = Some(Attachment {
            id: fresh(t, "eni-attach-"),
            instance_id: to.clone(),
            device_index: device,
            card_index: card,
            status: AttachmentStatus::Attaching,
            attach_time: now_ms(),
            delete_on_termination: false,
            ena_queue_count: None,
            force_detach: false,
        });
        t.put(eni.clone());
        Ok((to, eni))
    })?;
    // 3. Plug it, then commit.
    let inst = api
        .store
        .read(|st| st.get::<Instance>(&to).cloned())
        .ok_or_else(|| ApiError::internal("standby vanished"))?;
    let res = api.driver.attach(&inst, &eni);
    let attachment = eni
        .attachment
        .as_ref()
        .map(|a| a.id.clone())
        .unwrap_or_default();
    api.store.write(|t| {
        if let Some(mut cur) = t.get::<Eni>(eni_id).cloned() {
            if let Some(a) = cur.attachment.as_mut().filter(|a| a.id == attachment) {
                match &res {
                    Ok(()) => a.status = AttachmentStatus::Attached,
                    Err(_) => cur.attachment = None,
                }
                t.put(cur);
            }
        }
        Ok::<_, ApiError>(())
    })?;
    if let Err(e) = res {
        return Err(ApiError::new(
            "NoHealthyStandby",
            format!("Attaching {eni_id} to {to} failed ({e}); it is attached nowhere."),
        ));
    }
    let elapsed = t0.elapsed();
    tracing::info!(eni = eni_id, from = ?from, to = %to, ms = elapsed.as_millis() as u64, "ENI moved");
    Ok(Moved {
        from,
        to,
        attachment,
        elapsed,
    })
}

fn write_moved(x: &mut Xml, eni: &str, m: &Moved) {
    x.text("networkInterfaceId", eni)
        .text("previousInstanceId", m.from.as_deref().unwrap_or(""))
        .text("instanceId", &m.to)
        .text("attachmentId", &m.attachment)
        .num("elapsedMs", m.elapsed.as_millis());
}

/// `FailoverNetworkInterface`: NetworkInterfaceId, InstanceId.N (the
/// standbys in order; default: the ENI's group's standbys).
pub fn failover_network_interface(api: &Api, p: &Params) -> Result<String, ApiError> {
    let eni = req(p, "NetworkInterfaceId")?;
    ENI.check(eni)?;
    let mut standbys: Vec<String> = list(p, "InstanceId")?
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in &standbys {
        INSTANCE.check(s)?;
    }
    if standbys.is_empty() {
        standbys = api.store.read(|st| {
            st.iter::<FailoverGroup>()
                .find(|g| g.eni_id == eni)
                .map(|g| g.standbys.clone())
                .unwrap_or_default()
        });
    }
    if standbys.is_empty() {
        return Err(ApiError::missing("InstanceId.1"));
    }
    let m = move_eni(api, eni, &standbys)?;
    record(api, eni, &format!("moved to {} by request", m.to), true);
    api.driver.refresh_guest(&m.to);
    let mut x = Xml::new();
    write_moved(&mut x, eni, &m);
    Ok(x.finish())
}

/// Note an event on the ENI's group (if it has one).
fn record(api: &Api, eni: &str, event: &str, moved: bool) {
    let _ = api.store.write(|t: &mut Txn<'_>| {
        let g = t.iter::<FailoverGroup>().find(|g| g.eni_id == eni).cloned();
        if let Some(mut g) = g {
            if g.last_event.as_deref() != Some(event) || moved {
                g.last_event = Some(event.to_string());
                g.last_event_time = now_ms();
                if moved {
                    g.failovers += 1;
                }
                t.put(g);
            }
        }
        Ok::<_, ApiError>(())
    });
}

/// `CreateFailoverGroup`: NetworkInterfaceId, StandbyInstanceId.N.
pub fn create_failover_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let eni_id = req(p, "NetworkInterfaceId")?;
    let standbys = list(p, "StandbyInstanceId")?;
    if standbys.is_empty() {
        return Err(ApiError::missing("StandbyInstanceId.1"));
    }
    if standbys.len() > MAX_STANDBYS {
        return Err(ApiError::invalid(format!(
            "A failover group has at most {MAX_STANDBYS} standbys, not {}.",
            standbys.len()
        )));
    }
    let g = api.store.write(|t| {
        let eni = ENI.get::<Eni>(t, eni_id)?.clone();
        if let Some(g) = t.iter::<FailoverGroup>().find(|g| g.eni_id == eni_id) {
            return Err(ApiError::new(
                "FailoverGroupAlreadyExists",
                format!("{eni_id} already belongs to failover group {}.", g.id),
            ));
        }
        let mut seen = Vec::new();
        for s in &standbys {
            let inst = INSTANCE.get::<Instance>(t, s)?;
            if inst.vpc_id != eni.vpc_id {
                return Err(ApiError::invalid(format!(
                    "Standby {s} is in {}, the interface {eni_id} in {}.",
                    inst.vpc_id, eni.vpc_id
                )));
            }
            if inst.az != eni.az {
                return Err(ApiError::combination(format!(
                    "Standby {s} is in {}, the interface {eni_id} in {}.",
                    inst.az, eni.az
                )));
            }
            if seen.contains(s) {
                return Err(ApiError::invalid(format!("Standby {s} is listed twice.")));
            }
            seen.push(*s);
        }
        let g = FailoverGroup {
            id: fresh(t, "efg-"),
            eni_id: eni_id.to_string(),
            standbys: standbys.iter().map(|s| s.to_string()).collect(),
            creation_time: now_ms(),
            failovers: 0,
            last_event: None,
            last_event_time: 0,
            tags: Tags::default(),
        };
        t.put(g.clone());
        Ok(g)
    })?;
    let mut x = Xml::new();
    x.open("failoverGroup");
    write_group(&mut x, &g);
    x.close("failoverGroup");
    Ok(x.finish())
}

fn write_group(x: &mut Xml, g: &FailoverGroup) {
    x.text("failoverGroupId", &g.id)
        .text("networkInterfaceId", &g.eni_id)
        .set("standbySet", g.standbys.iter(), |x, s| {
            x.text("instanceId", s);
        })
        .num("failoverCount", g.failovers)
        .text("lastEvent", g.last_event.as_deref().unwrap_or(""))
        .num("lastEventTime", g.last_event_time);
}

/// `DescribeFailoverGroups`: FailoverGroupId.N (default: all).
pub fn describe_failover_groups(api: &Api, p: &Params) -> Result<String, ApiError> {
    let ids = list(p, "FailoverGroupId")?;
    api.store.read(|st| {
        let sel = GROUP.get_many::<FailoverGroup>(st, &ids)?;
        let mut x = Xml::new();
        x.set("failoverGroupSet", sel, |x, g| {
            write_group(x, g);
        });
        Ok(x.finish())
    })
}

/// `DeleteFailoverGroup`: FailoverGroupId (the ENI stays where it is).
pub fn delete_failover_group(api: &Api, p: &Params) -> Result<String, ApiError> {
    let id = req(p, "FailoverGroupId")?;
    api.store.write(|t| {
        GROUP.get::<FailoverGroup>(t, id)?;
        t.remove(id);
        Ok::<_, ApiError>(())
    })?;
    Ok(super::vpc::ret_true())
}

/// Watches the holders of every group's ENI and moves the ENI when its
/// holder fails (QEMU exited, or no heartbeat for
/// [`super::qemu_driver::HEARTBEAT_TIMEOUT`]). One thread; it stops when
/// the API is dropped.
pub struct Detector;

impl Detector {
    pub fn start(api: &Arc<Api>) {
        let weak: Weak<Api> = Arc::downgrade(api);
        let spawned = std::thread::Builder::new()
            .name("enilab-failover".into())
            .spawn(move || {
                let mut retry_at: std::collections::BTreeMap<String, Instant> = Default::default();
                loop {
                    std::thread::sleep(DETECT_INTERVAL);
                    let Some(api) = weak.upgrade() else { return };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        tick(&api, &mut retry_at)
                    }));
                    if r.is_err() {
                        tracing::error!("failover detector tick panicked");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the failover detector: {e}");
        }
    }
}

/// One look at every group.
fn tick(api: &Api, retry_at: &mut std::collections::BTreeMap<String, Instant>) {
    let work: Vec<(String, Vec<String>, Option<String>)> = api.store.read(|st| {
        st.iter::<FailoverGroup>()
            .filter_map(|g| {
                let eni = st.get::<Eni>(&g.eni_id)?;
                match &eni.attachment {
                    Some(a) if a.status == AttachmentStatus::Attached => {
                        let inst = st.get::<Instance>(&a.instance_id)?;
                        if inst.state != InstanceState::Running {
                            return None;
                        }
                        match api.driver.health(inst) {
                            Health::Failed(why) => Some((
                                g.eni_id.clone(),
                                g.standbys.clone(),
                                Some(format!("{} failed: {why}", inst.id)),
                            )),
                            _ => None,
                        }
                    }
                    Some(_) => None,
                    None => Some((g.eni_id.clone(), g.standbys.clone(), None)),
                }
            })
            .collect()
    });
    let now = Instant::now();
    for (eni, standbys, failure) in work {
        if failure.is_none() && retry_at.get(&eni).is_some_and(|t| now < *t) {
            continue;
        }
        if let Some(f) = &failure {
            tracing::warn!(eni = %eni, "{f}; failing over");
        }
        match move_eni(api, &eni, &standbys) {
            Ok(m) => {
                retry_at.remove(&eni);
                let what = match &failure {
                    Some(f) => format!("{f}; moved to {} in {} ms", m.to, m.elapsed.as_millis()),
                    None => format!("attached to standby {}", m.to),
                };
                record(api, &eni, &what, true);
                api.driver.refresh_guest(&m.to);
            }
            Err(e) => {
                retry_at.insert(eni.clone(), now + RETRY_INTERVAL);
                let what = match &failure {
                    Some(f) => format!("{f}; {}", e.message()),
                    None => e.message(),
                };
                record(api, &eni, &what, false);
            }
        }
    }
}

/// `POST /enilab/backend/restart[?card=N]` and
/// `POST /enilab/instance/pause?id=I&paused=true|false`: live operations
/// outside the EC2 API. `None` when `path` is not one of them.
pub fn live_op(api: &Api, path: &str, query: &str) -> Option<(u16, serde_json::Value)> {
    use serde_json::json;
    let arg = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let bad = |m: String| (400, json!({"error": m}));
    match path {
        BACKEND_RESTART_PATH => {
            let card = match arg("card") {
                None => None,
                Some(c) => match c.parse::<u32>() {
                    Ok(c) => Some(c),
                    Err(_) => return Some(bad(format!("card must be a number, not {c:?}"))),
                },
            };
            Some(match api.driver.restart_backend(card) {
                Ok(v) => (200, v),
                Err(e) => bad(e.to_string()),
            })
        }
        PAUSE_PATH => {
            let Some(id) = arg("id") else {
                return Some(bad("id is required".into()));
            };
            let paused = match arg("paused").as_deref() {
                None | Some("true") => true,
                Some("false") => false,
                Some(o) => return Some(bad(format!("paused must be true or false, not {o:?}"))),
            };
            Some(match api.driver.pause(&id, paused) {
                Ok(()) => (200, json!({"instance": id, "paused": paused})),
                Err(e) => bad(e.to_string()),
            })
        }
        _ => None,
    }
}

pub const BACKEND_RESTART_PATH: &str = "/enilab/backend/restart";
pub const PAUSE_PATH: &str = "/enilab/instance/pause";

/// Errors of the live-operation client.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("cannot reach the daemon at {0}")]
    Connect(std::net::SocketAddr, #[source] std::io::Error),
    #[error("the daemon at {0} gave an answer that is not HTTP with JSON")]
    Answer(std::net::SocketAddr),
}

/// `POST path_and_query` to a daemon's live-operation endpoint: the HTTP
/// status and the JSON answer (for `enilab restart-backend` and tests).
pub fn post_live(
    addr: std::net::SocketAddr,
    path_and_query: &str,
) -> Result<(u16, serde_json::Value), FailoverError> {
    use std::io::{Read, Write};
    let io = |e| FailoverError::Connect(addr, e);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    write!(
        s,
        "POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(FailoverError::Answer(addr))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(FailoverError::Answer(addr))?;
    let v = serde_json::from_str(body).map_err(|_| FailoverError::Answer(addr))?;
    Ok((status, v))
}
