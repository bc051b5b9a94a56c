//! VPC flow logs: per-worker aggregation, one writer thread.
//!
//! A worker counts packets and bytes per (flow log, interface, 5-tuple,
//! action, window) in its own map, with no sharing and no lock, and hands
//! the map to the writer once a second. The writer merges the pieces from
//! every worker and appends a v2 default-format record per key to the flow
//! log's file once the aggregation window has closed (plus a grace second
//! for the workers' hand-off).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::FlowLogSpec;

/// The v2 default format's field names, written as a file's first line.
pub const HEADER: &str =
    "version account-id interface-id srcaddr dstaddr srcport dstport protocol packets bytes start end action log-status";

/// Records one worker keeps per hand-off before it starts skipping (and says
/// so with a SKIPDATA record).
const MAX_LOCAL_RECORDS: usize = 65_536;

/// Seconds the writer waits after a window closes for workers to hand over.
const GRACE_SECS: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RecordKey {
    /// The flow log's `Arc` address: unique while the record holds it.
    log: usize,
    eni: Arc<str>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    accept: bool,
    window: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Aggregate {
    spec: Arc<FlowLogSpec>,
    packets: u64,
    bytes: u64,
    first: u64,
    last: u64,
}

/// What one packet contributes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observation {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub bytes: usize,
    pub packets: u64,
    pub accept: bool,
}

/// Skipped-record counts by (log, interface, window).
type Skipped = HashMap<(usize, Arc<str>, u64), (Arc<FlowLogSpec>, u64)>;

enum Msg {
    Batch(
        Vec<(RecordKey, Aggregate)>,
        Vec<(Arc<FlowLogSpec>, Arc<str>, u64, u64)>,
    ),
    /// Write every window now, then answer.
    Flush(Sender<()>),
    /// Write everything and end: workers' senders may outlive the switch.
    Stop,
}

/// The writer thread and the channel into it.
pub(crate) struct FlowLogWriter {
    tx: Mutex<Option<Sender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FlowLogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowLogWriter").finish_non_exhaustive()
    }
}

impl FlowLogWriter {
    /// `unix_now` gives the current Unix second (the switch's clock).
    pub fn start(unix_now: Arc<dyn Fn() -> u64 + Send + Sync>) -> FlowLogWriter {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("flowlog".into())
            .spawn(move || writer_loop(rx, unix_now))
            .ok();
        if thread.is_none() {
            tracing::error!("cannot start the flow-log writer thread; flow logs are off");
        }
        FlowLogWriter {
            tx: Mutex::new(thread.as_ref().map(|_| tx)),
            thread: Mutex::new(thread),
        }
    }

    fn sender(&self) -> Option<Sender<Msg>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Write every pending window now (closed or not) and wait for it.
    pub fn flush(&self) {
        let Some(tx) = self.sender() else { return };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
    }

    pub fn stop(&self) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for FlowLogWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A worker's private aggregation map.
pub(crate) struct LocalLog {
    map: HashMap<RecordKey, Aggregate>,
    /// (log, interface, window, count) of records skipped for space.
    skipped: Vec<(Arc<FlowLogSpec>, Arc<str>, u64, u64)>,
    tx: Option<Sender<Msg>>,
    last_handoff: u64,
}

impl LocalLog {
    pub fn new(writer: &FlowLogWriter) -> LocalLog {
        LocalLog {
            map: HashMap::new(),
            skipped: Vec::new(),
            tx: writer.sender(),
            last_handoff: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.skipped.is_empty()
    }

    /// Count one packet on `eni` for every flow log in `logs` that wants its
    /// action.
    pub fn observe(
        &mut self,
        logs: &[Arc<FlowLogSpec>],
        eni: &Arc<str>,
        o: &Observation,
        unix: u64,
    ) {
        for spec in logs {
            let cfg = &spec.config;
            if !cfg.traffic.wants(o.accept) {
                continue;
            }
            let interval = u64::from(cfg.interval_secs.max(1));
            let window = unix / interval * interval;
            let key = RecordKey {
                log: Arc::as_ptr(spec) as usize,
                eni: eni.clone(),
                src: o.src,
                dst: o.dst,
                src_port: o.src_port,
                dst_port: o.dst_port,
                protocol: o.protocol,
                accept: o.accept,
                window,
            };
            if let Some(agg) = self.map.get_mut(&key) {
                agg.packets += o.packets;
                agg.bytes += o.bytes as u64;
                agg.last = unix;
                continue;
            }
            if self.map.len() >= MAX_LOCAL_RECORDS {
                match self
                    .skipped
                    .iter_mut()
                    .find(|(s, e, w, _)| Arc::ptr_eq(s, spec) && e == eni && *w == window)
                {
                    Some(s) => s.3 += 1,
                    None => self.skipped.push((spec.clone(), eni.clone(), window, 1)),
                }
                continue;
            }
            self.map.insert(
                key,
                Aggregate {
                    spec: spec.clone(),
                    packets: o.packets,
                    bytes: o.bytes as u64,
                    first: unix,
                    last: unix,
                },
            );
        }
    }

    /// Hand the map to the writer if a second has passed (or `force`).
    pub fn handoff(&mut self, unix: u64, force: bool) {
        if self.is_empty() || (!force && unix == self.last_handoff) {
            return;
        }
        self.last_handoff = unix;
        let batch: Vec<_> = self.map.drain().collect();
        let skipped = std::mem::take(&mut self.skipped);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Batch(batch, skipped));
        }
    }
}

impl Drop for LocalLog {
    fn drop(&mut self) {
        self.handoff(0, true);
    }
}

fn writer_loop(rx: Receiver<Msg>, unix_now: Arc<dyn Fn() -> u64 + Send + Sync>) {
    let mut open: HashMap<RecordKey, Aggregate> = HashMap::new();
    let mut skipped: Skipped = HashMap::new();
    loop {
        let msg = rx.recv_timeout(Duration::from_millis(250));
        let mut reply = None;
        match msg {
            Ok(Msg::Batch(batch, skips)) => {
                for (k, a) in batch {
                    match open.get_mut(&k) {
                        Some(o) => {
                            o.packets += a.packets;
                            o.bytes += a.bytes;
                            o.first = o.first.min(a.first);
                            o.last = o.last.max(a.last);
                        }
                        None => {
                            open.insert(k, a);
                        }
                    }
                }
                for (spec, eni, window, n) in skips {
                    let key = (Arc::as_ptr(&spec) as usize, eni, window);
                    skipped.entry(key).or_insert((spec, 0)).1 += n;
                }
            }
            Ok(Msg::Flush(done)) => reply = Some(done),
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                write_closed(&mut open, &mut skipped, u64::MAX);
                return;
            }
        }
        let cutoff = if reply.is_some() {
            u64::MAX
        } else {
            unix_now().saturating_sub(GRACE_SECS)
        };
        write_closed(&mut open, &mut skipped, cutoff);
        if let Some(done) = reply {
            let _ = done.send(());
        }
    }
}

/// Write every record whose window ended at or before `cutoff`.
fn write_closed(open: &mut HashMap<RecordKey, Aggregate>, skipped: &mut Skipped, cutoff: u64) {
    let ends =
        |spec: &FlowLogSpec, window: u64| window + u64::from(spec.config.interval_secs.max(1));
    let mut due: Vec<(RecordKey, Aggregate)> = Vec::new();
    open.retain(|k, a| {
        if ends(&a.spec, k.window) <= cutoff {
            due.push((k.clone(), a.clone()));
            false
        } else {
            true
        }
    });
    let mut lines: HashMap<PathBuf, Vec<(u64, String)>> = HashMap::new();
    for (k, a) in due {
        let cfg = &a.spec.config;
        let line = format!(
            "2 {} {} {} {} {} {} {} {} {} {} {} {} OK",
            cfg.account_id,
            k.eni,
            k.src,
            k.dst,
            k.src_port,
            k.dst_port,
            k.protocol,
            a.packets,
            a.bytes,
            a.first,
            a.last,
            if k.accept { "ACCEPT" } else { "REJECT" },
        );
        lines
            .entry(cfg.path.clone())
            .or_default()
            .push((a.first, line));
    }
    let mut done = Vec::new();
    for ((ptr, eni, window), (spec, _n)) in skipped.iter() {
        if ends(spec, *window) <= cutoff {
            let end = ends(spec, *window);
            let line = format!(
                "2 {} {} - - - - - - - {} {} - SKIPDATA",
                spec.config.account_id, eni, window, end
            );
            lines
                .entry(spec.config.path.clone())
                .or_default()
                .push((*window, line));
            done.push((*ptr, eni.clone(), *window));
        }
    }
    for k in done {
        skipped.remove(&k);
    }
    for (path, mut recs) in lines {
        recs.sort();
        if let Err(e) = append(&path, &recs) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write flow-log records");
        }
    }
}

fn append(path: &PathBuf, recs: &[(u64, String)]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let mut out = String::new();
    if f.metadata()?.len() == 0 {
        out.push_str(HEADER);
        out.push('\n');
    }
    for (_, l) in recs {
        out.push_str(l);
        out.push('\n');
    }
    f.write_all(out.as_bytes())
}
