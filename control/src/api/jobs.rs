//! Runs [`Job`]s on worker threads after their change is committed, and
//! commits the outcome.
//!
//! The queue owns its threads: dropping it (with the `Api`) or calling
//! [`JobQueue::shutdown`] stops the timer, discards what is queued (every
//! job's intent is in the store; the next `Api::open` recovers it), lets
//! running jobs finish, and joins every thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::store::model::*;
use crate::store::{Store, Txn};

use super::driver::{InstanceDriver, Job};
use super::eni::remove_eni;
use super::instance::instance_enis;
use super::pubip;
use super::ApiError;

/// Worker threads; jobs of one instance always go to the same one.
const WORKERS: usize = 4;

pub struct JobQueue {
    /// `None` once shut down (the workers' channels are closed).
    senders: Arc<Vec<Mutex<Option<Sender<Job>>>>>,
    idle: Arc<(Mutex<usize>, std::sync::Condvar)>,
    timer: Arc<Timer>,
    stopping: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Jobs due later (deregistration delays), by due time: one thread sleeps
/// until the earliest and hands it to the workers.
#[derive(Default)]
struct Timer {
    due: Mutex<std::collections::BTreeMap<(std::time::Instant, u64), Job>>,
    cv: std::sync::Condvar,
}

impl JobQueue {
    pub fn start(store: Arc<Store>, driver: Arc<dyn InstanceDriver>) -> JobQueue {
        let idle = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for n in 0..WORKERS {
            let (tx, rx) = channel::<Job>();
            let store = store.clone();
            let driver = driver.clone();
            let idle = idle.clone();
            let stop = stopping.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("enilab-job-{n}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if stop.load(Ordering::Acquire) {
                            // Shutting down: the store keeps the intent.
                            let (m, cv) = &*idle;
                            let mut pending = m.lock().unwrap_or_else(|e| e.into_inner());
                            *pending = pending.saturating_sub(1);
                            cv.notify_all();
                            continue;
                        }
                        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            run(&store, driver.as_ref(), &job)
                        }));
                        match res {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(?job, "job failed: {e}"),
                            Err(_) => tracing::error!(?job, "job panicked"),
                        }
                        let (m, cv) = &*idle;
                        let mut pending = m.lock().unwrap_or_else(|e| e.into_inner());
                        *pending = pending.saturating_sub(1);
                        cv.notify_all();
                    }
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => tracing::error!("cannot start job worker: {e}"),
            }
            senders.push(Mutex::new(Some(tx)));
        }
        let q = JobQueue {
            senders: Arc::new(senders),
            idle,
            timer: Arc::new(Timer::default()),
            stopping,
            threads: Mutex::new(threads),
        };
        let (senders, idle, timer, stop) = (
            q.senders.clone(),
            q.idle.clone(),
            q.timer.clone(),
            q.stopping.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("enilab-job-timer".into())
            .spawn(move || timer_loop(&timer, &senders, &idle, &stop));
        match spawned {
            Ok(h) => q.lock_threads().push(h),
            Err(e) => tracing::error!("cannot start the job timer: {e}"),
        }
        q
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the timer and the workers and join them: queued and delayed
    /// jobs are discarded (the store keeps their intent for the next
    /// `Api::open`), running ones finish first. Idempotent; `Drop` calls
    /// it. Called from one of the queue's own threads, it does not wait for
    /// that thread.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            // Under the timer's lock, so it cannot miss the wake-up between
            // its check of `stopping` and its wait.
            let mut due = self.timer.due.lock().unwrap_or_else(|e| e.into_inner());
            if !due.is_empty() {
                tracing::debug!(jobs = due.len(), "job queue stopped with delayed jobs");
            }
            due.clear();
            self.timer.cv.notify_all();
        }
        for s in self.senders.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        let me = std::thread::current().id();
        let handles = std::mem::take(&mut *self.lock_threads());
        for h in handles {
            if h.thread().id() != me && h.join().is_err() {
                tracing::error!("a job thread panicked");
            }
        }
    }

    /// Queue `job` to run once `delay` has passed.
    pub fn push_after(&self, job: Job, delay: std::time::Duration) {
        if delay.is_zero() {
            return self.push(job);
        }
        let at = std::time::Instant::now() + delay;
        let mut due = self.timer.due.lock().unwrap_or_else(|e| e.into_inner());
        let seq = crate::store::ids::random_u64();
        due.insert((at, seq), job);
        self.timer.cv.notify_all();
    }

    pub fn push(&self, job: Job) {
        push_to(&self.senders, &self.idle, job)
    }
}

impl Drop for JobQueue {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn timer_loop(
    timer: &Timer,
    senders: &[Mutex<Option<Sender<Job>>>],
    idle: &Arc<(Mutex<usize>, std::sync::Condvar)>,
    stopping: &AtomicBool,
) {
    let mut due = timer.due.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        let now = std::time::Instant::now();
        let ready: Vec<(std::time::Instant, u64)> =
            due.range(..(now, u64::MAX)).map(|(k, _)| *k).collect();
        for k in ready {
            if let Some(job) = due.remove(&k) {
                push_to(senders, idle, job);
            }
        }
        let wait = due
            .keys()
            .next()
            .map(|(at, _)| at.saturating_duration_since(now))
            .unwrap_or(std::time::Duration::from_secs(3600));
        due = timer
            .cv
            .wait_timeout(due, wait)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

fn push_to(
    senders: &[Mutex<Option<Sender<Job>>>],
    idle: &Arc<(Mutex<usize>, std::sync::Condvar)>,
    job: Job,
) {
    let h = job.instance().bytes().fold(0usize, |a, b| {
        a.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let Some(sender) = senders.get(h % senders.len().max(1)) else {
        tracing::error!("no job worker; job {job:?} dropped");
        return;
    };
    {
        let (m, _) = &**idle;
        *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }
    let sent = match &*sender.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(s) => s.send(job).map_err(|e| e.0),
        None => Err(job),
    };
    if let Err(job) = sent {
        tracing::warn!("job queue stopped; job {job:?} dropped");
        let (m, _) = &**idle;
        let mut p = m.lock().unwrap_or_else(|e| e.into_inner());
        *p = p.saturating_sub(1);
    }
}

impl JobQueue {
    /// Wait until no job is queued or running (tests, shutdown).
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let (m, cv) = &*self.idle;
        let guard = m.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = cv
            .wait_timeout_while(guard, timeout, |p| *p > 0)
            .unwrap_or_else(|e| e.into_inner());
        *g == 0
    }
}

fn snapshot(store: &Store, id: &str) -> Option<(Instance, Vec<Eni>)> {
    store.read(|st| {
        st.get::<Instance>(id).map(|i| {
            (
                i.clone(),
                instance_enis(st, id).into_iter().cloned().collect(),
            )
        })
    })
}

fn set_state(
    t: &mut Txn<'_>,
    id: &str,
    from: InstanceState,
    to: InstanceState,
    reason: Option<(String, String)>,
) {
    if let Some(mut i) = t.get::<Instance>(id).cloned() {
        if i.state == from {
            i.state = to;
            i.state_reason = reason;
            t.put(i);
            // Leaving pending/running releases the launch public IP (never
            // assigns: workers do not fail on a full pool).
            let _ = pubip::sync_instance(t, None, id);
        }
    }
}

/// Terminated: delete-on-termination interfaces go, the others are
/// detached, and the instance leaves every target group (as in AWS).
fn release_interfaces(t: &mut Txn<'_>, id: &str) {
    super::elb::tg::forget_instance(t, id);
    let enis: Vec<Eni> = instance_enis(t, id).into_iter().cloned().collect();
    for mut e in enis {
        if e.attachment
            .as_ref()
            .is_some_and(|a| a.delete_on_termination)
        {
            remove_eni(t, &e.id);
        } else {
            // A kept interface loses the launch public IP and the right to one.
            e.attachment = None;
            e.public_ip = None;
            e.auto_public_ip = false;
            t.put(e);
        }
    }
}

/// Run one job: call the driver with nothing locked, then commit.
pub fn run(store: &Store, driver: &dyn InstanceDriver, job: &Job) -> Result<(), ApiError> {
    use InstanceState::*;
    match job {
        Job::Launch(id) | Job::Start(id) => {
            let Some((inst, enis)) = snapshot(store, id) else {
                return Ok(());
            };
            if inst.state != Pending {
                return Ok(());
            }
            let res = if matches!(job, Job::Launch(_)) {
                driver.launch(&inst, &enis)
            } else {
                driver.start(&inst, &enis)
            };
            store.write(|t| {
                match &res {
                    Ok(()) => set_state(t, id, Pending, Running, None),
                    Err(e) => {
                        let reason = Some((
                            "Server.InternalError".to_string(),
                            format!("Server.InternalError: {e}"),
                        ));
                        if matches!(job, Job::Launch(_)) {
                            set_state(t, id, Pending, Terminated, reason);
                            release_interfaces(t, id);
                        } else {
                            set_state(t, id, Pending, Stopped, reason);
                        }
                    }
                }
                Ok::<_, ApiError>(())
            })
        }
        Job::Stop(id) => {
            let Some((inst, _)) = snapshot(store, id) else {
                return Ok(());
            };
            if inst.state != Stopping {
                return Ok(());
            }
            let res = driver.stop(&inst);
            store.write(|t| {
                let reason = match &res {
                    Ok(()) => inst.state_reason.clone(),
                    Err(e) => Some((
                        "Server.InternalError".to_string(),
                        format!("stopped after an error: {e}"),
                    )),
                };
                set_state(t, id, Stopping, Stopped, reason);
                Ok::<_, ApiError>(())
            })
        }
        Job::Terminate(id) => {
            let Some((inst, _)) = snapshot(store, id) else {
                return Ok(());
            };
            if inst.state != ShuttingDown {
                return Ok(());
            }
            if let Err(e) = driver.terminate(&inst) {
                tracing::warn!("terminate {id}: {e}; recording it as terminated");
            }
            store.write(|t| {
                set_state(t, id, ShuttingDown, Terminated, inst.state_reason.clone());
                release_interfaces(t, id);
                Ok::<_, ApiError>(())
            })
        }
        Job::Attach { eni, instance } => {
            let found = store.read(|st| {
                let e = st.get::<Eni>(eni)?.clone();
                let i = st.get::<Instance>(instance)?.clone();
                e.attachment
                    .as_ref()
                    .filter(|a| {
                        a.instance_id == *instance && a.status == AttachmentStatus::Attaching
                    })
                    .map(|_| (e.clone(), i))
            });
            let Some((e, inst)) = found else {
                return Ok(());
            };
            let res = driver.attach(&inst, &e);
            store.write(|t| {
                if let Some(mut cur) = t.get::<Eni>(eni).cloned() {
                    let Some(a) = cur.attachment.as_mut() else {
                        return Ok(());
                    };
                    if a.status != AttachmentStatus::Attaching {
                        return Ok(());
                    }
                    match &res {
                        Ok(()) => a.status = AttachmentStatus::Attached,
                        Err(err) => {
                            tracing::warn!("attach {eni} to {instance} failed: {err}");
                            cur.attachment = None;
                        }
                    }
                    t.put(cur);
                }
                Ok::<_, ApiError>(())
            })
        }
        Job::Detach {
            eni,
            instance,
            force,
        } => {
            let found = store.read(|st| {
                let e = st.get::<Eni>(eni)?.clone();
                let i = st.get::<Instance>(instance)?.clone();
                e.attachment
                    .as_ref()
                    .filter(|a| {
                        a.instance_id == *instance && a.status == AttachmentStatus::Detaching
                    })
                    .map(|_| (e.clone(), i))
            });
            let Some((e, inst)) = found else {
                return Ok(());
            };
            let res = driver.detach(&inst, &e, *force);
            store.write(|t| {
                if let Some(mut cur) = t.get::<Eni>(eni).cloned() {
                    let Some(a) = cur.attachment.as_mut() else {
                        return Ok(());
                    };
                    if a.status != AttachmentStatus::Detaching {
                        return Ok(());
                    }
                    match &res {
                        Ok(()) => cur.attachment = None,
                        Err(err) if *force => {
                            tracing::warn!("forced detach of {eni}: {err}; detached anyway");
                            cur.attachment = None;
                        }
                        Err(err) => {
                            tracing::warn!("detach {eni} failed: {err}; still attached");
                            a.status = AttachmentStatus::Attached;
                        }
                    }
                    t.put(cur);
                }
                Ok::<_, ApiError>(())
            })
        }
        Job::NatGateway(id) => store.write(|t| super::natgw::finish(t, id)),
        Job::LoadBalancer(id) => store.write(|t| super::elb::finish_load_balancer(t, id)),
        Job::Drain {
            target_group,
            target,
            port,
            since,
        } => store.write(|t| super::elb::finish_drain(t, target_group, target, *port, *since)),
    }
}

/// After a restart: the jobs that transitional states still need, and
/// running instances the driver no longer has recorded as stopped.
pub fn recover(store: &Store, driver: &dyn InstanceDriver) -> Result<Vec<Job>, ApiError> {
    let (jobs, lost) = store.read(|st| {
        let mut jobs = Vec::new();
        let mut lost = Vec::new();
        for i in st.iter::<Instance>() {
            match i.state {
                InstanceState::Pending => jobs.push(Job::Start(i.id.clone())),
                InstanceState::Stopping => jobs.push(Job::Stop(i.id.clone())),
                InstanceState::ShuttingDown => jobs.push(Job::Terminate(i.id.clone())),
                InstanceState::Running => {
                    let enis: Vec<Eni> = instance_enis(st, &i.id).into_iter().cloned().collect();
                    if !driver.adopt(i, &enis) {
                        lost.push(i.id.clone());
                    }
                }
                _ => {}
            }
        }
        for n in st.iter::<NatGateway>() {
            if matches!(n.state, NatState::Pending | NatState::Deleting) {
                jobs.push(Job::NatGateway(n.id.clone()));
            }
        }
        for lb in st.iter::<LoadBalancer>() {
            if lb.state == LbState::Provisioning {
                jobs.push(Job::LoadBalancer(lb.id.clone()));
            }
        }
        for e in st.iter::<Eni>() {
            if let Some(a) = &e.attachment {
                match a.status {
                    AttachmentStatus::Attaching => jobs.push(Job::Attach {
                        eni: e.id.clone(),
                        instance: a.instance_id.clone(),
                    }),
                    AttachmentStatus::Detaching => jobs.push(Job::Detach {
                        eni: e.id.clone(),
                        instance: a.instance_id.clone(),
                        force: a.force_detach,
                    }),
                    _ => {}
                }
            }
        }
        (jobs, lost)
    });
    if !lost.is_empty() {
        store.write(|t| {
            for id in &lost {
                set_state(
                    t,
                    id,
                    InstanceState::Running,
                    InstanceState::Stopped,
                    Some((
                        "Server.InternalError".into(),
                        "the instance was not running after a daemon restart".into(),
                    )),
                );
            }
            Ok::<_, ApiError>(())
        })?;
    }
    Ok(jobs)
}

/// After a restart: draining targets, each with what is left of its
/// deregistration delay.
pub fn recover_delayed(store: &Store) -> Vec<(Job, std::time::Duration)> {
    let now = super::common::now_ms();
    store.read(|st| {
        let mut out = Vec::new();
        for tg in st.iter::<TargetGroup>() {
            let delay_ms = u64::from(tg.deregistration_delay_s()) * 1000;
            for tgt in &tg.targets {
                if let Some(since) = tgt.draining_since {
                    let left = (since + delay_ms).saturating_sub(now);
                    out.push((
                        Job::Drain {
                            target_group: tg.id.clone(),
                            target: tgt.id.clone(),
                            port: tgt.port,
                            since,
                        },
                        std::time::Duration::from_millis(left),
                    ));
                }
            }
        }
        out
    })
}
