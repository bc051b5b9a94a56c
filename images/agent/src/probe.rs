//! A fine-grained reachability probe for blackout measurements
//! (`enilab-agent echo ADDR` and `enilab-agent probe ADDR INTERVAL_MS SECONDS`).
//!
//! The echo server answers each UDP datagram with `<payload> <instance>`
//! (the instance id from the kernel command line), so the probe knows who
//! answered. The probe sends a numbered datagram every interval and prints
//! one JSON line: replies per responder and the longest gap between two
//! consecutive replies, with who answered on each side of it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Serve UDP echo on `addr` forever.
pub fn echo(addr: SocketAddr, me: &str) -> std::io::Result<()> {
    let s = UdpSocket::bind(addr)?;
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, peer)) = s.recv_from(&mut buf) else {
            continue;
        };
        let mut out = buf.get(..n.min(64)).unwrap_or(&[]).to_vec();
        out.push(b' ');
        out.extend_from_slice(me.as_bytes());
        let _ = s.send_to(&out, peer);
    }
}

/// What a probe saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sent: u64,
    pub replies: BTreeMap<String, u64>,
    pub max_gap_ms: u64,
    pub gap_from: String,
    pub gap_to: String,
    pub replies_before_gap: u64,
    pub replies_after_gap: u64,
    pub last: String,
    /// The first change of responder: the time from the last reply of the
    /// first responder to the first reply of the next (a failover's
    /// blackout, whatever other gaps the window had).
    pub switch_ms: u64,
    pub switch_from: String,
    pub switch_to: String,
}

/// Fold reply events (ms since start, responder) into a report.
pub fn summarize(sent: u64, events: &[(u64, String)]) -> Report {
    let mut r = Report {
        sent,
        ..Default::default()
    };
    let mut gap_at = 0usize;
    for (i, (t, who)) in events.iter().enumerate() {
        *r.replies.entry(who.clone()).or_default() += 1;
        if i > 0 {
            let g = t.saturating_sub(events[i - 1].0);
            if g > r.max_gap_ms {
                r.max_gap_ms = g;
                r.gap_from = events[i - 1].1.clone();
                r.gap_to = who.clone();
                gap_at = i;
            }
        }
    }
    if let Some(i) = events
        .iter()
        .position(|(_, w)| *w != events[0].1 && w != "(end)")
    {
        r.switch_ms = events[i].0.saturating_sub(events[i - 1].0);
        r.switch_from = events[i - 1].1.clone();
        r.switch_to = events[i].1.clone();
    }
    r.replies_before_gap = gap_at as u64;
    r.replies_after_gap = (events.len() - gap_at) as u64;
    r.last = events.last().map(|e| e.1.clone()).unwrap_or_default();
    r
}

impl Report {
    pub fn json(&self) -> String {
        let replies: Vec<String> = self
            .replies
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!(
            "{{\"sent\":{},\"replies\":{{{}}},\"max_gap_ms\":{},\"gap_from\":\"{}\",\"gap_to\":\"{}\",\"before\":{},\"after\":{},\"last\":\"{}\",\"switch_ms\":{},\"switch_from\":\"{}\",\"switch_to\":\"{}\"}}",
            self.sent,
            replies.join(","),
            self.max_gap_ms,
            self.gap_from,
            self.gap_to,
            self.replies_before_gap,
            self.replies_after_gap,
            self.last,
            self.switch_ms,
            self.switch_from,
            self.switch_to
        )
    }
}

/// Probe `addr` every `interval` for `duration`.
pub fn probe(addr: SocketAddr, interval: Duration, duration: Duration) -> std::io::Result<Report> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(5)))?;
    let t0 = Instant::now();
    let mut next = t0;
    let mut seq = 0u64;
    let mut events = Vec::new();
    let mut buf = [0u8; 512];
    while t0.elapsed() < duration {
        if Instant::now() >= next {
            let _ = s.send_to(format!("{seq}").as_bytes(), addr);
            seq += 1;
            next += interval;
        }
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(buf.get(..n).unwrap_or(&[])).to_string();
            let who = text.split_whitespace().nth(1).unwrap_or("?").to_string();
            events.push((t0.elapsed().as_millis() as u64, who));
        }
    }
    // The end of the window counts as an event: traffic that never comes
    // back is a gap to the end, not a short one.
    events.push((t0.elapsed().as_millis() as u64, "(end)".to_string()));
    let mut r = summarize(seq, &events);
    if let Some(n) = r.replies.remove("(end)") {
        r.replies_after_gap = r.replies_after_gap.saturating_sub(n);
    }
    r.last = events
        .iter()
        .rev()
        .nth(1)
        .map(|e| e.1.clone())
        .unwrap_or_default();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_is_the_change_of_responder_not_the_longest_gap() {
        let ev: Vec<(u64, String)> = [(0, "a"), (400, "a"), (450, "a"), (600, "b"), (650, "b")]
            .iter()
            .map(|(t, w)| (*t, w.to_string()))
            .collect();
        let r = summarize(5, &ev);
        assert_eq!((r.max_gap_ms, r.gap_from.as_str()), (400, "a"));
        assert_eq!(
            (r.switch_ms, r.switch_from.as_str(), r.switch_to.as_str()),
            (150, "a", "b")
        );
        let same = summarize(2, &ev[..3]);
        assert_eq!((same.switch_ms, same.switch_to.as_str()), (0, ""));
    }

    #[test]
    fn summary_table() {
        let ev = |v: &[(u64, &str)]| -> Vec<(u64, String)> {
            v.iter().map(|(t, w)| (*t, w.to_string())).collect()
        };
        // (events, max gap, from, to, before, after)
        type Case<'a> = (Vec<(u64, String)>, u64, &'a str, &'a str, u64, u64);
        let cases: Vec<Case<'_>> = vec![
            (ev(&[]), 0, "", "", 0, 0),
            (ev(&[(0, "a"), (50, "a"), (100, "a")]), 50, "a", "a", 1, 2),
            (
                ev(&[(0, "a"), (50, "a"), (1450, "b"), (1500, "b")]),
                1400,
                "a",
                "b",
                2,
                2,
            ),
        ];
        for (events, gap, from, to, before, after) in cases {
            let r = summarize(10, &events);
            assert_eq!(
                (
                    r.max_gap_ms,
                    r.gap_from.as_str(),
                    r.gap_to.as_str(),
                    r.replies_before_gap,
                    r.replies_after_gap
                ),
                (gap, from, to, before, after),
                "{events:?}"
            );
        }
    }

    #[test]
    fn probe_against_a_local_echo() {
        let l = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        std::thread::spawn(move || echo(addr, "me"));
        std::thread::sleep(Duration::from_millis(100));
        let r = probe(addr, Duration::from_millis(20), Duration::from_millis(500)).unwrap();
        assert!(r.replies.get("me").copied().unwrap_or(0) > 10, "{r:?}");
        assert!(r.json().contains("\"me\":"));
    }
}
