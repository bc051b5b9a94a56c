//! Interface configuration from instance metadata, as amazon-ec2-net-utils
//! does it: every ENI gets route table `10000 + 100 * network-card +
//! device-number` with its subnet route and a default route through the
//! subnet's router, and a policy rule `from ADDR lookup TABLE` (priority =
//! the table) per local address and delegated prefix, so traffic leaves
//! through the interface that owns its source address. Addresses are
//! added to every ENI but the primary one (device 0, card 0), which DHCP
//! configures; its secondary addresses are added too. The main table is
//! left alone: only the primary ENI's default route (DHCP's) is there, so
//! a hot-attached ENI does not take the default route.
//!
//! The planning is pure ([`desired`], [`plan_iface`]): metadata, the
//! interfaces present and the last applied state in, `ip` commands out.
//! [`watch`] runs it every second and executes only what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::imds::{Client, ImdsError, IMDS};
use crate::net::is_managed;

/// Route table of device 0 on card 0; rule priorities equal the table.
pub const TABLE_BASE: u32 = 10_000;
/// Rule priorities this agent owns (swept at start).
const OWN_PRIORITIES: std::ops::Range<u32> = TABLE_BASE..TABLE_BASE + 10_000;

/// An IPv4 block `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Net {
    pub fn parse(s: &str) -> Option<Net> {
        let (a, l) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        if l.is_empty() || l.len() > 2 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: u8 = l.parse().ok()?;
        (len <= 32).then_some(Net { addr, len })
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    /// The block with host bits cleared.
    pub fn network(&self) -> Net {
        Net {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            len: self.len,
        }
    }

    /// The VPC router: the network address + 1.
    pub fn router(&self) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.addr) & self.mask()).wrapping_add(1))
    }

    pub fn host(addr: Ipv4Addr) -> Net {
        Net { addr, len: 32 }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the metadata service says about one ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniMeta {
    pub mac: String,
    pub device: u32,
    pub card: u32,
    /// The primary address first.
    pub ips: Vec<Ipv4Addr>,
    pub subnet: Net,
    pub prefixes: Vec<Net>,
}

/// A guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    /// Lowercase `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ifindex: u32,
}

/// How one interface should be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub ifindex: u32,
    pub mac: String,
    /// Device 0 on card 0: DHCP owns its primary address.
    pub primary: bool,
    pub table: u32,
    /// Never empty: the primary address first.
    pub ips: Vec<Ipv4Addr>,
    pub subnet: Net,
    pub prefixes: Vec<Net>,
}

impl Desired {
    /// The addresses this agent puts on the interface.
    pub fn own_addrs(&self) -> &[Ipv4Addr] {
        if self.primary {
            self.ips.get(1..).unwrap_or(&[])
        } else {
            &self.ips
        }
    }

    /// The source of the subnet route: the ENI's primary address.
    pub fn src(&self) -> Ipv4Addr {
        self.ips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// What the policy rules match: each address, each prefix.
    pub fn sources(&self) -> Vec<Net> {
        self.ips
            .iter()
            .map(|a| Net::host(*a))
            .chain(self.prefixes.iter().copied())
            .collect()
    }
}

/// The route table of an ENI, `None` for indexes past what the numbering
/// can tell apart.
pub fn table_of(card: u32, device: u32) -> Option<u32> {
    (card < 100 && device < 100).then(|| TABLE_BASE + 100 * card + device)
}

/// The configuration of every interface whose MAC the metadata lists.
pub fn desired(ifaces: &[Iface], metas: &[EniMeta]) -> BTreeMap<String, Desired> {
    let mut out = BTreeMap::new();
    for i in ifaces {
        let Some(m) = metas.iter().find(|m| m.mac.eq_ignore_ascii_case(&i.mac)) else {
            continue;
        };
        let Some(table) = table_of(m.card, m.device) else {
            continue;
        };
        if m.ips.is_empty() {
            continue;
        }
        out.insert(
            i.name.clone(),
            Desired {
                ifindex: i.ifindex,
                mac: i.mac.clone(),
                primary: m.card == 0 && m.device == 0,
                table,
                ips: m.ips.clone(),
                subnet: m.subnet.network(),
                prefixes: m.prefixes.clone(),
            },
        );
    }
    out
}

/// The kernel's view of an interface, read without running anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub ifindex: u32,
    pub addrs: BTreeSet<Ipv4Addr>,
    /// When DHCP last wrote its lease (it may have flushed and re-added
    /// the primary address, and the kernel drops routes with it).
    pub lease: Option<u128>,
}

/// What was applied to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub want: Desired,
    /// The DHCP lease stamp seen when planning.
    pub lease: Option<u128>,
    /// The table's routes were installed (their source address was there).
    pub routed: bool,
    /// Every command succeeded; if not, the next plan redoes it all.
    pub complete: bool,
}

impl Applied {
    /// Whether `now` still shows what was applied for `w`: nothing to do.
    pub fn settled(&self, w: &Desired, now: &Observed) -> bool {
        self.complete
            && &self.want == w
            && now.ifindex == w.ifindex
            && now.lease == self.lease
            && w.own_addrs().iter().all(|a| now.addrs.contains(a))
            && now.addrs.contains(&w.src()) == self.routed
    }
}

/// One `ip` invocation (the arguments after `ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd(pub Vec<String>);

impl Cmd {
    fn new(args: &[&str]) -> Cmd {
        Cmd(args.iter().map(|s| s.to_string()).collect())
    }

    /// Removals and flushes: failing means there was nothing to remove.
    pub fn tolerant(&self) -> bool {
        matches!(
            self.0.get(1).map(String::as_str),
            Some("del") | Some("flush")
        )
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ip {}", self.0.join(" "))
    }
}

/// Commands for one interface: removals run before any addition (an
/// address moving between interfaces is deleted from the old one first).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<Cmd>,
    pub add: Vec<Cmd>,
    /// The plan installs the table's routes.
    pub routed: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

fn rule(op: &str, src: Net, table: u32) -> Cmd {
    let t = table.to_string();
    let s = src.to_string();
    Cmd::new(&["rule", op, "from", &s, "lookup", &t, "priority", &t])
}

fn addr(op: &str, a: Ipv4Addr, len: u8, dev: &str) -> Cmd {
    let cidr = format!("{a}/{len}");
    Cmd::new(&["addr", op, &cidr, "dev", dev])
}

fn flush_table(table: u32) -> Cmd {
    Cmd::new(&["route", "flush", "table", &table.to_string()])
}

/// Undo `p` on interface `dev`: its rules and routes, and if the
/// interface is still there (`link`) its addresses but those in `keep`.
fn teardown(dev: &str, p: &Desired, link: bool, keep: &[Ipv4Addr], plan: &mut Plan) {
    for s in p.sources() {
        plan.remove.push(rule("del", s, p.table));
    }
    plan.remove.push(flush_table(p.table));
    if link {
        for a in p.own_addrs().iter().filter(|a| !keep.contains(a)) {
            plan.remove.push(addr("del", *a, p.subnet.len, dev));
        }
    }
}

/// The commands that take interface `dev` from `prev` (the last applied
/// state, if any) to `want` (`None`: no longer an ENI, or gone), given
/// what the kernel shows now (`now`, `None` if the interface is gone).
/// Nothing when nothing changed. Every addition is idempotent, so a plan
/// interrupted halfway is finished by the next one.
pub fn plan_iface(
    dev: &str,
    prev: Option<&Applied>,
    want: Option<&Desired>,
    now: Option<&Observed>,
) -> Plan {
    let mut plan = Plan::default();
    let link_of = |d: &Desired| now.is_some_and(|o| o.ifindex == d.ifindex);
    let Some(w) = want else {
        if let Some(p) = prev {
            teardown(dev, &p.want, link_of(&p.want), &[], &mut plan);
        }
        return plan;
    };
    if let (Some(p), Some(o)) = (prev, now) {
        if p.settled(w, o) {
            plan.routed = p.routed;
            return plan;
        }
    }
    // What the last plan left, on this very interface (not one re-plugged
    // under the same name), to change step by step; else start afresh.
    let same = prev.filter(|p| p.complete && p.want.ifindex == w.ifindex);
    match (prev, same) {
        (Some(p), None) => teardown(dev, &p.want, link_of(&p.want), w.own_addrs(), &mut plan),
        (_, Some(p)) => {
            let keep = w.own_addrs();
            for a in p.want.own_addrs() {
                if !keep.contains(a) {
                    plan.remove.push(addr("del", *a, p.want.subnet.len, dev));
                }
            }
            let sources = w.sources();
            for s in p.want.sources() {
                if p.want.table != w.table || !sources.contains(&s) {
                    plan.remove.push(rule("del", s, p.want.table));
                }
            }
            if p.want.table != w.table {
                plan.remove.push(flush_table(p.want.table));
            }
        }
        (None, None) => {}
    }
    let fresh = same.is_none_or(|p| p.want.table != w.table);
    if fresh {
        plan.add.push(flush_table(w.table));
    }
    if fresh && !w.primary {
        plan.add.push(Cmd::new(&["link", "set", "dev", dev, "up"]));
    }
    let present = |a: &Ipv4Addr| now.is_some_and(|o| o.addrs.contains(a));
    for a in w.own_addrs() {
        if fresh || !present(a) {
            plan.add.push(addr("replace", *a, w.subnet.len, dev));
        }
    }
    // Routes need their source address on the interface: for the primary
    // ENI that is DHCP's to add; the plan after it does will route.
    if present(&w.src()) || w.own_addrs().contains(&w.src()) {
        let t = w.table.to_string();
        let subnet = w.subnet.to_string();
        let src = w.src().to_string();
        let gw = w.subnet.router().to_string();
        plan.add.push(Cmd::new(&[
            "route", "replace", &subnet, "dev", dev, "src", &src, "table", &t,
        ]));
        plan.add.push(Cmd::new(&[
            "route", "replace", "default", "via", &gw, "dev", dev, "table", &t,
        ]));
        plan.routed = true;
    }
    let had: Vec<Net> = same
        .filter(|p| p.want.table == w.table)
        .map(|p| p.want.sources())
        .unwrap_or_default();
    for s in w.sources() {
        if !had.contains(&s) {
            // Deleted first: a rule left by an earlier agent is not doubled.
            plan.add.push(rule("del", s, w.table));
            plan.add.push(rule("add", s, w.table));
        }
    }
    plan
}

/// Rules in the agent's priority range, from `ip -4 rule show` output:
/// the deletions that clear what an earlier run left.
pub fn stale_rules(listing: &str) -> Vec<Cmd> {
    let mut out = Vec::new();
    for line in listing.lines() {
        let Some((prio, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(prio) = prio.trim().parse::<u32>() else {
            continue;
        };
        if !OWN_PRIORITIES.contains(&prio) {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (Some(from), Some(table)) = (
            words
                .iter()
                .position(|w| *w == "from")
                .and_then(|i| words.get(i + 1)),
            words
                .iter()
                .position(|w| *w == "lookup")
                .and_then(|i| words.get(i + 1)),
        ) else {
            continue;
        };
        let p = prio.to_string();
        out.push(Cmd::new(&[
            "rule", "del", "from", from, "lookup", table, "priority", &p,
        ]));
    }
    out
}

// ----- reading the metadata ---------------------------------------------

fn parse_num(s: &str) -> Option<u32> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// The MACs a `network/interfaces/macs/` listing names.
pub fn parse_macs(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|m| {
            m.len() == 17
                && m.split(':').count() == 6
                && m.split(':')
                    .all(|h| h.len() == 2 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}

/// One ENI from its metadata values; `None` if any is malformed.
pub fn parse_eni(
    mac: &str,
    device: &str,
    card: &str,
    ips: &str,
    subnet: &str,
    prefixes: Option<&str>,
) -> Option<EniMeta> {
    let ips: Vec<Ipv4Addr> = ips
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().parse().ok())
        .collect::<Option<_>>()?;
    let prefixes: Vec<Net> = prefixes
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(Net::parse)
        .collect::<Option<_>>()?;
    Some(EniMeta {
        mac: mac.to_string(),
        device: parse_num(device)?,
        card: parse_num(card)?,
        ips,
        subnet: Net::parse(subnet)?,
        prefixes,
    })
}

/// What one round of metadata reads gave.
#[derive(Debug, Default)]
pub struct Fetched {
    pub metas: Vec<EniMeta>,
    /// MACs whose values could not be read this time: keep their config.
    pub failed: BTreeSet<String>,
}

/// Read the ENIs among `macs` (the interfaces we have). An error only when
/// the listing itself could not be read: then nothing is known.
pub fn fetch(client: &mut Client, macs: &[String]) -> Result<Fetched, ImdsError> {
    const BASE: &str = "/latest/meta-data/network/interfaces/macs/";
    // Every instance has the directory (empty without interfaces): a 404
    // says the service does not know us, which tells nothing.
    let listed = parse_macs(&client.get(BASE)?.ok_or(ImdsError::Status(404))?);
    let mut out = Fetched::default();
    for mac in macs.iter().filter(|m| listed.contains(m)) {
        let mut get = |leaf: &str| client.get(&format!("{BASE}{mac}/{leaf}"));
        let one = (|| -> Result<Option<EniMeta>, ImdsError> {
            let (Some(dev), Some(card), Some(ips), Some(subnet)) = (
                get("device-number")?,
                get("network-card")?,
                get("local-ipv4s")?,
                get("subnet-ipv4-cidr-block")?,
            ) else {
                // Gone between the listing and now.
                return Ok(None);
            };
            let prefixes = get("ipv4-prefix")?;
            Ok(parse_eni(
                mac,
                &dev,
                &card,
                &ips,
                &subnet,
                prefixes.as_deref(),
            ))
        })();
        match one {
            Ok(Some(m)) => out.metas.push(m),
            Ok(None) => {}
            Err(_) => {
                out.failed.insert(mac.clone());
            }
        }
    }
    Ok(out)
}

// ----- the system side --------------------------------------------------

/// Where the watcher looks and how often.
#[derive(Debug, Clone)]
pub struct EniConfig {
    pub sysfs: PathBuf,
    /// The DHCP script's lease files (`<if>.lease`).
    pub lease_dir: PathBuf,
    pub interval: Duration,
    /// A failed interface is retried after this long.
    pub retry: Duration,
    pub timeout: Duration,
}

impl Default for EniConfig {
    fn default() -> Self {
        EniConfig {
            sysfs: PathBuf::from("/sys/class/net"),
            lease_dir: PathBuf::from("/run/enilab/net"),
            interval: Duration::from_secs(1),
            retry: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
        }
    }
}

fn log(msg: &str) {
    eprintln!("enilab-agent: eni: {msg}");
}

/// Until when (milliseconds of uptime) the watcher reconciles every
/// [`FAST_INTERVAL`] instead of every `interval`: set by [`nudge`].
static FAST_UNTIL_MS: AtomicU64 = AtomicU64::new(0);
/// A nudge not yet seen by the watcher.
static NUDGED: AtomicBool = AtomicBool::new(false);
const FAST_INTERVAL: Duration = Duration::from_millis(100);
/// How long a nudge keeps the watcher fast: a hot-plugged NIC shows up in
/// the guest about a second after the host asks for it.
const FAST_FOR_MS: u64 = 5_000;

/// The host says the ENIs changed (attach, failover, address moved):
/// reconcile now and often for a few seconds.
pub fn nudge() {
    FAST_UNTIL_MS.store(crate::sys::uptime_ms() + FAST_FOR_MS, Ordering::SeqCst);
    NUDGED.store(true, Ordering::SeqCst);
}

/// Sleep `interval`, or less: return early on a nudge; in the fast window
/// sleep [`FAST_INTERVAL`].
fn pause(interval: Duration) {
    let fast = crate::sys::uptime_ms() < FAST_UNTIL_MS.load(Ordering::SeqCst);
    let total = if fast { FAST_INTERVAL } else { interval };
    let deadline = Instant::now() + total;
    let slice = Duration::from_millis(20);
    while Instant::now() < deadline {
        if NUDGED.swap(false, Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(slice.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// The managed interfaces (`ethN`) with their MACs.
pub fn interfaces(sysfs: &Path) -> Vec<Iface> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(sysfs) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_managed(&name) {
            continue;
        }
        let read = |f: &str| fs::read_to_string(e.path().join(f)).ok();
        let (Some(mac), Some(idx)) = (read("address"), read("ifindex")) else {
            continue;
        };
        let Ok(ifindex) = idx.trim().parse() else {
            continue;
        };
        out.push(Iface {
            name,
            mac: mac.trim().to_ascii_lowercase(),
            ifindex,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// IPv4 addresses per interface, from getifaddrs(3).
pub fn ipv4_addrs() -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
    let mut out: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list pointer into `head`, a valid
    // out-pointer; on success the list is ours until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, which is
        // neither freed nor changed until freeifaddrs below.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr, which starts
        // with its family.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: for AF_INET the sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.entry(name).or_default().insert(ip);
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once;
    // no reference into the list outlives this point.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn observe(cfg: &EniConfig, ifaces: &[Iface]) -> BTreeMap<String, Observed> {
    let mut addrs = ipv4_addrs();
    ifaces
        .iter()
        .map(|i| {
            let lease = fs::metadata(cfg.lease_dir.join(format!("{}.lease", i.name)))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos());
            (
                i.name.clone(),
                Observed {
                    ifindex: i.ifindex,
                    addrs: addrs.remove(&i.name).unwrap_or_default(),
                    lease,
                },
            )
        })
        .collect()
}

/// Run `ip` with `cmd`; whether it succeeded (logged either way).
fn run(cmd: &Cmd) -> bool {
    let out = Command::new("ip")
        .args(&cmd.0)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            log(&cmd.to_string());
            true
        }
        Ok(o) if cmd.tolerant() => {
            // Nothing to remove: expected, and not worth a line each.
            let _ = o;
            true
        }
        Ok(o) => {
            log(&format!(
                "{cmd} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            false
        }
        Err(e) => {
            log(&format!("cannot run {cmd}: {e}"));
            false
        }
    }
}

/// Delete the rules an earlier agent left (it may have configured
/// addresses that are gone now).
fn sweep_rules() {
    match Command::new("ip").args(["-4", "rule", "show"]).output() {
        Ok(o) if o.status.success() => {
            for c in stale_rules(&String::from_utf8_lossy(&o.stdout)) {
                run(&c);
            }
        }
        _ => log("cannot list the policy rules"),
    }
}

/// Runs the ENI configuration loop until `stop` is set.
pub fn watch(cfg: EniConfig, stop: Arc<AtomicBool>) {
    // Deleting an interface's first address must not take the others
    // (of the same subnet) with it.
    let _ = fs::write("/proc/sys/net/ipv4/conf/all/promote_secondaries", "1");
    sweep_rules();
    let mut client = Client::new(IMDS, cfg.timeout);
    let mut applied: BTreeMap<String, Applied> = BTreeMap::new();
    let mut retry_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut last_error = String::new();
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        if !first {
            pause(cfg.interval);
        }
        first = false;
        let ifaces = interfaces(&cfg.sysfs);
        if ifaces.is_empty() && applied.is_empty() {
            continue;
        }
        let macs: Vec<String> = ifaces.iter().map(|i| i.mac.clone()).collect();
        let fetched = match fetch(&mut client, &macs) {
            Ok(f) => f,
            Err(e) => {
                // Unknown is not empty: keep everything as it is.
                let msg = e.to_string();
                if msg != last_error {
                    log(&format!("{msg}; keeping the current configuration"));
                    last_error = msg;
                }
                continue;
            }
        };
        if !last_error.is_empty() {
            log("metadata service reachable");
            last_error.clear();
        }
        let mut want = desired(&ifaces, &fetched.metas);
        for i in &ifaces {
            if fetched.failed.contains(&i.mac) {
                if let Some(a) = applied.get(&i.name).filter(|a| a.want.ifindex == i.ifindex) {
                    want.insert(i.name.clone(), a.want.clone());
                }
            }
        }
        let now = observe(&cfg, &ifaces);
        let names: BTreeSet<String> = applied.keys().chain(want.keys()).cloned().collect();
        let t = Instant::now();
        let mut plans = Vec::new();
        for name in names {
            if retry_at.get(&name).is_some_and(|r| t < *r) {
                continue;
            }
            let plan = plan_iface(&name, applied.get(&name), want.get(&name), now.get(&name));
            if !plan.is_empty() {
                plans.push((name, plan));
            }
        }
        if plans.is_empty() {
            continue;
        }
        for (name, _) in &plans {
            match want.get(name) {
                Some(w) => log(&format!(
                    "{name} ({}): ENI device {} card {}, table {}, addresses {:?}{}",
                    w.mac,
                    (w.table - TABLE_BASE) % 100,
                    (w.table - TABLE_BASE) / 100,
                    w.table,
                    w.ips,
                    if w.primary { " (primary)" } else { "" }
                )),
                None => log(&format!(
                    "{name}: no longer an ENI here, removing its configuration"
                )),
            }
        }
        let mut ok: BTreeMap<&str, bool> = BTreeMap::new();
        for (name, plan) in &plans {
            // Every command runs even after a failure: each is independent.
            let good = plan.remove.iter().filter(|c| !run(c)).count() == 0;
            ok.insert(name, good);
        }
        for (name, plan) in &plans {
            let good = plan.add.iter().filter(|c| !run(c)).count() == 0;
            *ok.entry(name).or_insert(true) &= good;
        }
        for (name, plan) in &plans {
            let complete = ok.get(name.as_str()).copied().unwrap_or(false);
            match want.get(name) {
                Some(w) => {
                    if complete {
                        retry_at.remove(name);
                    } else {
                        log(&format!(
                            "{name}: incomplete; redoing it in {:?}",
                            cfg.retry
                        ));
                        retry_at.insert(name.clone(), t + cfg.retry);
                    }
                    applied.insert(
                        name.clone(),
                        Applied {
                            want: w.clone(),
                            lease: now.get(name).and_then(|o| o.lease),
                            routed: plan.routed,
                            complete,
                        },
                    );
                }
                None => {
                    retry_at.remove(name);
                    applied.remove(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
