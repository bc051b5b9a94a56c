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
use super::driver::{Confirm, Health};
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
/// holder fails: QEMU exited, or no heartbeat for
/// [`super::qemu_driver::HEARTBEAT_TIMEOUT`] *confirmed* by the driver
/// ([`super::driver::InstanceDriver::confirm_failure`]: QEMU says the
/// vCPUs do not run, or the silence lasted
/// [`super::qemu_driver::RUNNING_SILENCE_TIMEOUT`]), so a loaded host's
/// late heartbeats do not move an ENI. A holder whose QEMU died is then
/// stopped the way EC2 records a crashed host (`Server.InternalError`); a
/// hung one stays `running` and fails its status check
/// (DescribeInstanceStatus). One thread; it stops when the API is dropped.
pub struct Detector;

impl Detector {
    pub fn start(api: &Arc<Api>) {
        let weak: Weak<Api> = Arc::downgrade(api);
        let spawned = std::thread::Builder::new()
            .name("enilab-failover".into())
            .spawn(move || {
                let mut st = DetectorState::default();
                loop {
                    std::thread::sleep(DETECT_INTERVAL);
                    let Some(api) = weak.upgrade() else { return };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        tick(&api, &mut st)
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

/// What the detector remembers between ticks.
#[derive(Default)]
struct DetectorState {
    /// Groups whose ENI is attached nowhere: when to try again.
    retry_at: std::collections::BTreeMap<String, Instant>,
    /// Holders suspected but not confirmed failed (reported once each).
    suspects: std::collections::BTreeSet<String>,
}

/// One look at every group.
fn tick(api: &Api, ds: &mut DetectorState) {
    type Work = (String, Vec<String>, Option<(Instance, String)>);
    let work: Vec<Work> = api.store.read(|st| {
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
                                Some((inst.clone(), why)),
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
    let failing: std::collections::BTreeSet<String> = work
        .iter()
        .filter_map(|(_, _, f)| f.as_ref().map(|(i, _)| i.id.clone()))
        .collect();
    // A suspect that is healthy again starts a fresh episode next time.
    ds.suspects.retain(|id| failing.contains(id));
    let now = Instant::now();
    for (eni, standbys, failure) in work {
        let failure = match failure {
            // Confirmed with nothing locked: the driver may ask QEMU.
            Some((inst, why)) => match api.driver.confirm_failure(&inst, &why) {
                Confirm::Failed(why) => {
                    ds.suspects.remove(&inst.id);
                    let f = format!("{} failed: {why}", inst.id);
                    Some((inst, f))
                }
                Confirm::Suspect(why) => {
                    if ds.suspects.insert(inst.id.clone()) {
                        let what = format!("{} suspected, not moved: {why}", inst.id);
                        tracing::warn!(%eni, "{what}");
                        record(api, &eni, &what, false);
                    }
                    continue;
                }
            },
            None => None,
        };
        if failure.is_none() && ds.retry_at.get(&eni).is_some_and(|t| now < *t) {
            continue;
        }
        if let Some((_, f)) = &failure {
            tracing::warn!(eni = %eni, "{f}; failing over");
        }
        match move_eni(api, &eni, &standbys) {
            Ok(m) => {
                ds.retry_at.remove(&eni);
                let what = match &failure {
                    Some((_, f)) => {
                        format!("{f}; moved to {} in {} ms", m.to, m.elapsed.as_millis())
                    }
                    None => format!("attached to standby {}", m.to),
                };
                record(api, &eni, &what, true);
                api.driver.refresh_guest(&m.to);
            }
            Err(e) => {
                ds.retry_at.insert(eni.clone(), now + RETRY_INTERVAL);
                let what = match &failure {
                    Some((_, f)) => format!("{f}; {}", e.message()),
                    None => e.message(),
                };
                record(api, &eni, &what, false);
            }
        }
        // Moved or not (no standby qualified), a dead holder is dead.
        if let Some((inst, f)) = &failure {
            mark_failed_holder(api, inst, f);
        }
    }
}

/// After a failover away from `inst` (or a failed attempt): if its QEMU
/// is gone, record it as EC2 records an instance whose host failed:
/// `stopping` then `stopped` (through the ordinary stop job, which also
/// releases its public address), reason `Server.InternalError`. A hung
/// guest whose QEMU runs stays `running`: DescribeInstanceStatus shows it
/// impaired.
fn mark_failed_holder(api: &Api, inst: &Instance, why: &str) {
    if api.driver.is_running(inst) {
        return;
    }
    let stopping = api.store.write(|t: &mut Txn<'_>| {
        let Some(mut i) = t.get::<Instance>(&inst.id).cloned() else {
            return Ok(false);
        };
        if i.state != InstanceState::Running {
            return Ok(false);
        }
        i.state = InstanceState::Stopping;
        i.transition_reason = format!("Service initiated ({})", iso8601(now_ms()));
        i.state_reason = Some((
            "Server.InternalError".into(),
            format!("Server.InternalError: {why}"),
        ));
        t.put(i);
        super::pubip::sync_instance(t, Some(api.config.public_pool), &inst.id)?;
        Ok::<_, ApiError>(true)
    });
    match stopping {
        Ok(true) => api.jobs.push(super::driver::Job::Stop(inst.id.clone())),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(instance = %inst.id, "cannot record the failed holder: {}", e.message())
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::super::driver::InstanceDriver;
    use super::super::Config;
    use super::*;

    /// What the fake driver says about one instance: health, whether its
    /// QEMU runs, and the confirmation of a failure.
    #[derive(Clone)]
    struct Guest {
        health: Health,
        running: bool,
        confirm: Option<Confirm>,
    }

    /// Instances are healthy and running unless a test scripts otherwise.
    #[derive(Default)]
    struct FakeDriver(Mutex<BTreeMap<String, Guest>>);

    impl FakeDriver {
        fn set(&self, id: &str, g: Guest) {
            self.0.lock().unwrap().insert(id.to_string(), g);
        }
        fn get(&self, id: &str) -> Guest {
            self.0.lock().unwrap().get(id).cloned().unwrap_or(Guest {
                health: Health::Healthy,
                running: true,
                confirm: None,
            })
        }
    }

    impl InstanceDriver for FakeDriver {
        fn is_running(&self, inst: &Instance) -> bool {
            self.get(&inst.id).running
        }
        fn health(&self, inst: &Instance) -> Health {
            self.get(&inst.id).health
        }
        fn confirm_failure(&self, inst: &Instance, why: &str) -> Confirm {
            self.get(&inst.id)
                .confirm
                .unwrap_or_else(|| Confirm::Failed(why.to_string()))
        }
    }

    struct Lab {
        api: Arc<Api>,
        driver: Arc<FakeDriver>,
        dir: PathBuf,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }

    impl Lab {
        fn new() -> Lab {
            let dir = std::env::temp_dir().join(format!(
                "enilab-failover-{}",
                crate::store::ids::random_u64()
            ));
            let driver = Arc::new(FakeDriver::default());
            let api = Api::open(&dir, Config::default(), driver.clone()).expect("open api");
            Lab { api, driver, dir }
        }

        fn ec2(&self, action: &str, args: &[(&str, &str)]) -> String {
            let mut pairs = vec![("Action", action), ("Version", "2016-11-15")];
            pairs.extend_from_slice(args);
            let r = self.api.call(&Params::from_pairs(pairs));
            assert_eq!(r.status, 200, "{action}: {}", r.body);
            r.body
        }

        /// Poll `f` every 20 ms for up to 5 s.
        fn wait(&self, what: &str, mut f: impl FnMut() -> bool) {
            for _ in 0..250 {
                if f() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("timed out waiting for {what}");
        }

        fn holder(&self, eni: &str) -> String {
            let body = self.ec2(
                "DescribeNetworkInterfaces",
                &[("NetworkInterfaceId.1", eni)],
            );
            crate::api::bench::extract(&body, "instanceId")
                .unwrap_or("")
                .to_string()
        }

        fn instance_field(&self, id: &str, name: &str) -> String {
            let body = self.ec2("DescribeInstances", &[("InstanceId.1", id)]);
            crate::api::bench::extract(&body, name)
                .unwrap_or("")
                .to_string()
        }

        /// (instance check, system check) of `id`.
        fn status_checks(&self, id: &str) -> (String, String) {
            let body = self.ec2("DescribeInstanceStatus", &[("InstanceId.1", id)]);
            let get = |k: &str| {
                let part = crate::api::bench::extract(&body, k).unwrap_or("");
                crate::api::bench::extract(part, "status")
                    .unwrap_or("")
                    .to_string()
            };
            (get("instanceStatus"), get("systemStatus"))
        }
    }

    use crate::api::bench::field;

    /// A silent holder that QEMU says is running is only a suspect; once
    /// confirmed (hung) the ENI moves and the holder stays running with a
    /// failed instance check; a holder whose QEMU died is stopped with
    /// Server.InternalError after the move.
    #[test]
    fn confirmed_failures_move_the_eni_and_mark_the_holder() {
        let lab = Lab::new();
        let vpc = field(
            &lab.ec2("CreateVpc", &[("CidrBlock", "10.9.0.0/16")]),
            "vpcId",
        );
        let sub = field(
            &lab.ec2(
                "CreateSubnet",
                &[("VpcId", &vpc), ("CidrBlock", "10.9.1.0/24")],
            ),
            "subnetId",
        );
        let launch = || {
            field(
                &lab.ec2(
                    "RunInstances",
                    &[
                        ("ImageId", "ami-0e1ab000000000001"),
                        ("InstanceType", "t3.micro"),
                        ("MinCount", "1"),
                        ("MaxCount", "1"),
                        ("SubnetId", &sub),
                    ],
                ),
                "instanceId",
            )
        };
        let (a, b) = (launch(), launch());
        for id in [&a, &b] {
            lab.wait("running", || lab.instance_field(id, "name") == "running");
        }
        let eni = field(
            &lab.ec2("CreateNetworkInterface", &[("SubnetId", &sub)]),
            "networkInterfaceId",
        );
        lab.ec2(
            "AttachNetworkInterface",
            &[
                ("NetworkInterfaceId", &eni),
                ("InstanceId", &a),
                ("DeviceIndex", "1"),
            ],
        );
        lab.wait("attached to A", || lab.holder(&eni) == a);
        let group = field(
            &lab.ec2(
                "CreateFailoverGroup",
                &[
                    ("NetworkInterfaceId", &eni),
                    ("StandbyInstanceId.1", &a),
                    ("StandbyInstanceId.2", &b),
                ],
            ),
            "failoverGroupId",
        );
        let event = || {
            let body = lab.ec2("DescribeFailoverGroups", &[("FailoverGroupId.1", &group)]);
            (field(&body, "lastEvent"), field(&body, "failoverCount"))
        };
        assert_eq!(lab.status_checks(&a), ("ok".to_string(), "ok".to_string()));

        // A loaded host: silent, but QEMU says the vCPUs run.
        let silent = |confirm: Confirm, running: bool| Guest {
            health: Health::Failed("no agent heartbeat for 1300 ms".into()),
            running,
            confirm: Some(confirm),
        };
        lab.driver.set(
            &a,
            silent(Confirm::Suspect("QEMU reports it running".into()), true),
        );
        lab.wait("the suspicion recorded", || event().0.contains("suspected"));
        std::thread::sleep(DETECT_INTERVAL * 5);
        assert_eq!(lab.holder(&eni), a, "a suspect keeps its ENI");
        assert_eq!(event().1, "0");

        // Confirmed hung: the ENI moves; A stays running, impaired.
        lab.driver.set(
            &a,
            silent(
                Confirm::Failed("QEMU reports the guest paused".into()),
                true,
            ),
        );
        lab.wait("moved to B", || lab.holder(&eni) == b);
        assert!(event().0.contains("paused"), "{:?}", event());
        assert_eq!(event().1, "1");
        assert_eq!(lab.instance_field(&a, "name"), "running");
        assert_eq!(
            lab.status_checks(&a),
            ("impaired".to_string(), "ok".to_string())
        );
        assert_eq!(lab.status_checks(&b), ("ok".to_string(), "ok".to_string()));

        // A recovers; B's QEMU dies: back to A, B stopped by the service.
        lab.driver.set(
            &a,
            Guest {
                health: Health::Healthy,
                running: true,
                confirm: None,
            },
        );
        lab.driver.set(
            &b,
            Guest {
                health: Health::Failed("QEMU (pid 7) exited".into()),
                running: false,
                confirm: None,
            },
        );
        lab.wait("moved back to A", || lab.holder(&eni) == a);
        lab.wait("B stopped", || lab.instance_field(&b, "name") == "stopped");
        let reason = lab.ec2("DescribeInstances", &[("InstanceId.1", &b)]);
        assert_eq!(field(&reason, "code").as_str(), "80", "stopped: {reason}");
        let sr = field(&reason, "stateReason");
        assert!(
            sr.contains("Server.InternalError") && sr.contains("exited"),
            "{sr}"
        );
        assert!(
            field(&reason, "reason").starts_with("Service initiated"),
            "{reason}"
        );
        // Stopped instances are listed only on request.
        let none = lab.ec2("DescribeInstanceStatus", &[("InstanceId.1", &b)]);
        assert!(!none.contains(&b), "{none}");
        let all = lab.ec2(
            "DescribeInstanceStatus",
            &[("InstanceId.1", &b), ("IncludeAllInstances", "true")],
        );
        assert!(all.contains("not-applicable"), "{all}");

        // A dies too and no standby qualifies (B is stopped): the ENI is
        // attached nowhere, and A is recorded stopped all the same.
        lab.driver.set(
            &a,
            Guest {
                health: Health::Failed("QEMU (pid 8) exited".into()),
                running: false,
                confirm: None,
            },
        );
        lab.wait("A stopped", || lab.instance_field(&a, "name") == "stopped");
        assert_eq!(lab.holder(&eni), "", "attached nowhere");
        assert!(event().0.contains("exited"), "{:?}", event());
    }
}
