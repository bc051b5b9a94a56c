//! `GET /enilab/capture?eni=ENI[&count=N][&seconds=S]`: a live pcap of
//! what one ENI sends and receives, for `enilab capture`.
//!
//! The daemon asks the driver for a switch capture of the ENI's port (a
//! bounded ring the packet path copies into, see `enilab_switch::capture`),
//! and a thread drains it into a libpcap stream (nanosecond timestamps,
//! LINKTYPE_ETHERNET) that the HTTP body carries until the count or the
//! seconds are reached, or the client goes away. Not part of the EC2 API.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

use super::query::Params;
use super::Api;

/// Where the daemon serves it.
pub const PATH: &str = "/enilab/capture";

/// Frames a capture's ring holds before copies are lost.
const RING_FRAMES: usize = 4096;

/// Longest capture the daemon serves.
const MAX_SECONDS: u64 = 24 * 3600;

/// pcap global header magic for nanosecond timestamps.
const PCAP_MAGIC_NS: u32 = 0xa1b2_3c4d;

/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;

/// pcap global header length.
pub const PCAP_HEADER_LEN: usize = 24;

/// pcap per-record header length.
pub const RECORD_HEADER_LEN: usize = 16;

/// Failures of a capture, on either side.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the query needs eni=<network interface id>")]
    MissingEni,
    #[error("{0} must be a whole number")]
    BadNumber(&'static str),
    #[error("cannot reach the daemon at {0} (is `enilab serve` running?)")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("the daemon refused the capture: {0}")]
    Refused(String),
    #[error("the daemon's stream is not a pcap")]
    NotPcap,
    #[error("cannot write the capture")]
    Write(#[source] std::io::Error),
    #[error("the connection to the daemon failed")]
    Read(#[source] std::io::Error),
}

/// The pcap global header.
pub fn pcap_header() -> [u8; PCAP_HEADER_LEN] {
    let mut h = [0u8; PCAP_HEADER_LEN];
    h[0..4].copy_from_slice(&PCAP_MAGIC_NS.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&(enilab_switch::capture::SNAPLEN as u32).to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// Append one pcap record for `f`.
pub fn pcap_record(out: &mut Vec<u8>, f: &enilab_switch::CapturedFrame) {
    let secs = u32::try_from(f.unix_nanos / 1_000_000_000).unwrap_or(u32::MAX);
    let nanos = (f.unix_nanos % 1_000_000_000) as u32;
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
    out.extend_from_slice(&(f.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&f.orig_len.to_le_bytes());
    out.extend_from_slice(&f.data);
}

/// What a capture request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    pub eni: String,
    /// Stop after this many frames (None: no limit).
    pub count: Option<u64>,
    /// Stop after this many seconds (None: when the client leaves).
    pub seconds: Option<u64>,
}

impl CaptureRequest {
    /// Parse the query string of a capture request.
    pub fn parse(query: &str) -> Result<CaptureRequest, CaptureError> {
        let p = Params::parse(&[query.as_bytes()]).map_err(|_| CaptureError::MissingEni)?;
        let eni = p
            .get("eni")
            .filter(|e| !e.is_empty())
            .ok_or(CaptureError::MissingEni)?
            .to_string();
        let num = |name: &'static str| -> Result<Option<u64>, CaptureError> {
            match p.get(name) {
                None | Some("") => Ok(None),
                Some(v) => v
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| CaptureError::BadNumber(name)),
            }
        };
        Ok(CaptureRequest {
            eni,
            count: num("count")?.filter(|&n| n > 0),
            seconds: num("seconds")?.map(|s| s.min(MAX_SECONDS)),
        })
    }

    fn query(&self) -> String {
        let mut q = format!("eni={}", url_escape(&self.eni));
        if let Some(c) = self.count {
            q.push_str(&format!("&count={c}"));
        }
        if let Some(s) = self.seconds {
            q.push_str(&format!("&seconds={s}"));
        }
        q
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP body fed by a channel of chunks.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// Start the capture `req` asks for: a body streaming the pcap, or the
/// driver's reason it cannot (no datapath, ENI not on a running guest).
pub fn start(api: &Arc<Api>, req: &CaptureRequest) -> Result<ChannelBody, String> {
    let cap = api
        .driver
        .capture(&req.eni, RING_FRAMES)
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let req = req.clone();
    std::thread::Builder::new()
        .name("enilab-capture".into())
        .spawn(move || drain(cap, &req, &tx))
        .map_err(|e| format!("cannot start the capture thread: {e}"))?;
    Ok(ChannelBody { rx })
}

/// Move frames from the ring to the channel until a limit is reached or
/// the receiver is gone.
fn drain(cap: enilab_switch::Capture, req: &CaptureRequest, tx: &mpsc::Sender<Bytes>) {
    let started = Instant::now();
    let until = req.seconds.map(Duration::from_secs);
    if tx
        .blocking_send(Bytes::copy_from_slice(&pcap_header()))
        .is_err()
    {
        return;
    }
    let mut sent = 0u64;
    loop {
        if tx.is_closed()
            || until.is_some_and(|u| started.elapsed() >= u)
            || req.count.is_some_and(|c| sent >= c)
        {
            break;
        }
        let mut buf = Vec::new();
        while let Some(f) = cap.next_frame() {
            pcap_record(&mut buf, &f);
            sent += 1;
            if req.count.is_some_and(|c| sent >= c) || buf.len() > 256 * 1024 {
                break;
            }
        }
        if buf.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if tx.blocking_send(Bytes::from(buf)).is_err() {
            break;
        }
    }
    if cap.dropped() > 0 {
        tracing::warn!(
            eni = %req.eni,
            lost = cap.dropped(),
            "capture ring overflowed; copies were lost"
        );
    }
}

/// Splits a pcap byte stream into whole records so a capture stopped at
/// any moment leaves a file every reader accepts.
#[derive(Debug, Default)]
pub struct RecordSplitter {
    pending: Vec<u8>,
    header_seen: bool,
    /// Records passed on so far.
    pub records: u64,
}

impl RecordSplitter {
    /// Feed bytes; returns how many leading bytes of the pending data form
    /// whole units (the header, then whole records) and moves them to
    /// `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CaptureError> {
        self.pending.extend_from_slice(data);
        let mut at = 0;
        if !self.header_seen {
            if self.pending.len() < PCAP_HEADER_LEN {
                return Ok(());
            }
            if self.pending[..4] != PCAP_MAGIC_NS.to_le_bytes() {
                return Err(CaptureError::NotPcap);
            }
            self.header_seen = true;
            at = PCAP_HEADER_LEN;
        }
        loop {
            let rest = &self.pending[at..];
            if rest.len() < RECORD_HEADER_LEN {
                break;
            }
            let incl = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
            if incl > enilab_switch::capture::SNAPLEN {
                return Err(CaptureError::NotPcap);
            }
            if rest.len() < RECORD_HEADER_LEN + incl {
                break;
            }
            at += RECORD_HEADER_LEN + incl;
            self.records += 1;
        }
        out.extend_from_slice(&self.pending[..at]);
        self.pending.drain(..at);
        Ok(())
    }
}

/// Set by SIGINT in the client: stop after the records already received.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Make Ctrl-C end a client capture cleanly (whole records written).
pub fn stop_on_sigint() {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe; `signal` replaces no handler another part of this
    // process relies on (the client installs none).
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// Run a capture against the daemon at `addr`, writing whole pcap records
/// to `out` until the daemon ends the stream or [`STOP`] is set. Returns
/// the number of frames written.
pub fn fetch(
    addr: SocketAddr,
    req: &CaptureRequest,
    out: &mut dyn Write,
) -> Result<u64, CaptureError> {
    let io = |e| CaptureError::Connect(addr, e);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io)?;
    // HTTP/1.0: the body ends when the daemon closes the connection.
    write!(
        s,
        "GET {PATH}?{} HTTP/1.0\r\nHost: {addr}\r\n\r\n",
        req.query()
    )
    .map_err(io)?;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut split = RecordSplitter::default();
    let mut in_body = false;
    let mut whole = Vec::new();
    let mut deadline_hit = 0u32;
    loop {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // Headers must come within a few seconds.
                deadline_hit += 1;
                if !in_body && deadline_hit > 50 {
                    return Err(CaptureError::Read(e));
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CaptureError::Read(e)),
        };
        let data = &buf[..n];
        if in_body {
            split.feed(data, &mut whole)?;
        } else {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if head.len() > 64 * 1024 {
                    return Err(CaptureError::NotPcap);
                }
                continue;
            };
            let status = String::from_utf8_lossy(&head[..end]).to_string();
            let rest = head[end + 4..].to_vec();
            if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
                let mut msg = rest;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.take(64 * 1024).read_to_end(&mut msg);
                return Err(CaptureError::Refused(
                    String::from_utf8_lossy(&msg).trim().to_string(),
                ));
            }
            in_body = true;
            split.feed(&rest, &mut whole)?;
        }
        if !whole.is_empty() {
            out.write_all(&whole).map_err(CaptureError::Write)?;
            out.flush().map_err(CaptureError::Write)?;
            whole.clear();
        }
    }
    if !in_body {
        return Err(CaptureError::NotPcap);
    }
    Ok(split.records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u64, len: usize) -> enilab_switch::CapturedFrame {
        enilab_switch::CapturedFrame {
            unix_nanos: 1_700_000_000_123_456_789 + n,
            port: 1,
            direction: enilab_switch::Direction::FromGuest,
            orig_len: len as u32,
            data: vec![n as u8; len].into(),
        }
    }

    #[test]
    fn header_and_record_layout() {
        let h = pcap_header();
        assert_eq!(&h[..4], &[0x4d, 0x3c, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes([h[20], h[21], h[22], h[23]]), 1);
        let mut r = Vec::new();
        pcap_record(&mut r, &frame(0, 60));
        assert_eq!(r.len(), RECORD_HEADER_LEN + 60);
        assert_eq!(u32::from_le_bytes([r[0], r[1], r[2], r[3]]), 1_700_000_000);
        assert_eq!(u32::from_le_bytes([r[4], r[5], r[6], r[7]]), 123_456_789);
        assert_eq!(u32::from_le_bytes([r[8], r[9], r[10], r[11]]), 60);
    }

    #[test]
    fn splitter_passes_only_whole_records_whatever_the_cut() {
        let mut stream = pcap_header().to_vec();
        for (i, len) in [60usize, 1514, 42].into_iter().enumerate() {
            pcap_record(&mut stream, &frame(i as u64, len));
        }
        let whole_two = PCAP_HEADER_LEN + 2 * RECORD_HEADER_LEN + 60 + 1514;
        // Every cut point: what comes out before the last piece is a
        // prefix ending on a record boundary.
        for cut in [1, 5, 24, 30, 100, whole_two, stream.len() - 1] {
            let mut s = RecordSplitter::default();
            let mut out = Vec::new();
            s.feed(&stream[..cut], &mut out).expect("feed");
            let ok_ends = [
                0,
                PCAP_HEADER_LEN,
                PCAP_HEADER_LEN + RECORD_HEADER_LEN + 60,
                whole_two,
            ];
            assert!(ok_ends.contains(&out.len()), "cut {cut}: {}", out.len());
            s.feed(&stream[cut..], &mut out).expect("feed rest");
            assert_eq!(out, stream, "cut {cut}");
            assert_eq!(s.records, 3);
        }
    }

    #[test]
    fn splitter_refuses_what_is_not_a_pcap() {
        let mut s = RecordSplitter::default();
        let mut out = Vec::new();
        let r = s.feed(b"<Response><Errors>......", &mut out);
        assert!(matches!(r, Err(CaptureError::NotPcap)));
    }

    #[test]
    fn request_query_round_trip_and_errors() {
        type Want = Result<(&'static str, Option<u64>, Option<u64>), &'static str>;
        let cases: [(&str, Want); 5] = [
            ("eni=eni-1", Ok(("eni-1", None, None))),
            (
                "eni=eni-1&count=5&seconds=3",
                Ok(("eni-1", Some(5), Some(3))),
            ),
            ("eni=eni-1&count=0", Ok(("eni-1", None, None))),
            ("count=5", Err("eni")),
            ("eni=eni-1&seconds=x", Err("seconds")),
        ];
        for (q, want) in cases {
            match (CaptureRequest::parse(q), want) {
                (Ok(r), Ok((e, c, s))) => {
                    assert_eq!((r.eni.as_str(), r.count, r.seconds), (e, c, s), "{q}");
                    assert_eq!(CaptureRequest::parse(&r.query()).expect("again"), r);
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{q}: {e}"),
                (got, _) => panic!("{q}: {got:?}"),
            }
        }
    }
}
