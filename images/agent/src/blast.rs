//! Checksummed traffic for soak runs: `enilab-agent blast tcp|udp ADDR
//! SECONDS` sends, `enilab-agent sink tcp|udp ADDR SECONDS` receives and
//! verifies, and both print one JSON line of counts.
//!
//! TCP is one stream whose byte at offset i is `pattern(i)`: the sink
//! checks every byte, so a corrupted, duplicated or lost byte shows (TCP
//! itself never loses one). A dropped connection is reconnected and counted;
//! each connection starts its pattern at 0. UDP datagrams carry a sequence
//! number, a payload derived from it and an FNV-1a checksum: the sink
//! counts good, corrupt and missing (loss is allowed for UDP; corruption is
//! not).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Byte `i` of a stream.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

fn fnv(b: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &x in b {
        h ^= u32::from(x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A datagram: seq (8) | len (2) | payload (len) | fnv of the rest (4).
pub fn datagram(seq: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend((0..len as u64).map(|i| pattern(seq.wrapping_add(i))));
    let h = fnv(out);
    out.extend_from_slice(&h.to_be_bytes());
}

/// The sequence number of a good datagram, or None if it is corrupt.
pub fn check(d: &[u8]) -> Option<u64> {
    if d.len() < 14 {
        return None;
    }
    let (body, sum) = d.split_at(d.len() - 4);
    if fnv(body).to_be_bytes() != sum {
        return None;
    }
    let seq = u64::from_be_bytes(body[..8].try_into().ok()?);
    let len = usize::from(u16::from_be_bytes(body[8..10].try_into().ok()?));
    if body.len() != 10 + len {
        return None;
    }
    let ok = body[10..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(seq.wrapping_add(i as u64)));
    ok.then_some(seq)
}

/// Send for `secs`: TCP as fast as the stream takes it, UDP at about
/// 2000 datagrams a second.
pub fn blast(proto: &str, addr: SocketAddr, secs: u64) -> io::Result<String> {
    let end = Instant::now() + Duration::from_secs(secs);
    match proto {
        "tcp" => {
            let (mut bytes, mut connects) = (0u64, 0u64);
            let mut buf = vec![0u8; 16384];
            while Instant::now() < end {
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                connects += 1;
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let mut off = 0u64;
                while Instant::now() < end {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = pattern(off + i as u64);
                    }
                    match s.write_all(&buf) {
                        Ok(()) => {
                            off += buf.len() as u64;
                            bytes += buf.len() as u64;
                        }
                        Err(_) => break,
                    }
                }
            }
            Ok(format!(
                r#"{{"proto":"tcp","bytes":{bytes},"connects":{connects}}}"#
            ))
        }
        "udp" => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let mut d = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < end {
                datagram(seq, 64 + (seq % 1200) as usize, &mut d);
                let _ = s.send_to(&d, addr);
                seq += 1;
                if seq % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Ok(format!(r#"{{"proto":"udp","sent":{seq}}}"#))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown protocol {other}"),
        )),
    }
}

/// Receive on `addr` for `secs` and verify.
pub fn sink(proto: &str, addr: SocketAddr, secs: u64) -> io::Result<String> {
    let end = Instant::now() + Duration::from_secs(secs);
    match proto {
        "tcp" => {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            let (mut bytes, mut corrupt, mut conns) = (0u64, 0u64, 0u64);
            // The longest time without a byte while a connection was open.
            let mut stall_ms = 0u64;
            let mut buf = vec![0u8; 65536];
            while Instant::now() < end {
                let mut s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                conns += 1;
                s.set_nonblocking(false)?;
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut off = 0u64;
                let mut last = Instant::now();
                while Instant::now() < end {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            for &b in &buf[..n] {
                                if b != pattern(off) {
                                    corrupt += 1;
                                }
                                off += 1;
                            }
                            bytes += n as u64;
                            stall_ms = stall_ms.max(last.elapsed().as_millis() as u64);
                            last = Instant::now();
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            }
            Ok(format!(
                r#"{{"proto":"tcp","bytes":{bytes},"corrupt":{corrupt},"connections":{conns},"stall_ms":{stall_ms}}}"#
            ))
        }
        "udp" => {
            let s = UdpSocket::bind(addr)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let (mut good, mut corrupt, mut max_seq) = (0u64, 0u64, 0u64);
            let mut buf = vec![0u8; 2048];
            while Instant::now() < end {
                match s.recv(&mut buf) {
                    Ok(n) => match check(&buf[..n]) {
                        Some(seq) => {
                            good += 1;
                            max_seq = max_seq.max(seq);
                        }
                        None => corrupt += 1,
                    },
                    Err(_) => continue,
                }
            }
            Ok(format!(
                r#"{{"proto":"udp","good":{good},"corrupt":{corrupt},"highest":{max_seq}}}"#
            ))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown protocol {other}"),
        )),
    }
}

/// `blast|sink tcp|udp ADDR SECONDS`: prints the JSON report.
pub fn main(mode: &str, args: &[String]) -> i32 {
    let (Some(proto), Some(addr), Some(secs)) = (
        args.first(),
        args.get(1).and_then(|a| a.parse().ok()),
        args.get(2).and_then(|s| s.parse().ok()),
    ) else {
        eprintln!("usage: enilab-agent {mode} tcp|udp ADDR SECONDS");
        return 2;
    };
    let r = if mode == "blast" {
        blast(proto, addr, secs)
    } else {
        sink(proto, addr, secs)
    };
    match r {
        Ok(j) => {
            println!("{j}");
            let _ = io::stdout().flush();
            0
        }
        Err(e) => {
            eprintln!("enilab-agent {mode}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_verify_and_any_flip_is_caught() {
        let mut d = Vec::new();
        for seq in [0u64, 1, 77, u64::MAX] {
            datagram(seq, 300, &mut d);
            assert_eq!(check(&d), Some(seq));
            for i in 0..d.len() {
                let mut bad = d.clone();
                bad[i] ^= 0x10;
                assert_eq!(check(&bad), None, "flip at {i} of seq {seq}");
            }
            assert_eq!(check(&d[..d.len() - 1]), None);
        }
    }

    #[test]
    fn tcp_blast_and_sink_agree_on_loopback() {
        let addr: SocketAddr = "127.0.0.1:47913".parse().expect("addr");
        let sink = std::thread::spawn(move || sink("tcp", addr, 3));
        std::thread::sleep(Duration::from_millis(200));
        let sent = blast("tcp", addr, 1).expect("blast");
        let got = sink.join().expect("join").expect("sink");
        assert!(sent.contains(r#""connects":1"#), "{sent}");
        assert!(got.contains(r#""corrupt":0"#), "{got}");
        assert!(!got.contains(r#""bytes":0,"#), "{got}");
    }
}
