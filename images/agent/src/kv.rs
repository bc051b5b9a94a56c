//! A tiny replicated key-value service for failover tests (`enilab-agent
//! kv` and `enilab-agent kv-client`). Not a database: its one promise is
//! that a write is acknowledged only once its replica (if any) has it, so
//! an acknowledged write survives the loss of the primary.
//!
//! Line protocol over TCP: `SET key value` answers `OK` (or `ERR ...`),
//! `GET key` answers `VAL value` or `NONE`. Keys and values have no spaces.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors of the KV service.
#[derive(Debug)]
pub enum KvError {
    /// A bad command line.
    Usage(String),
    Io(std::io::Error),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::Usage(m) => write!(f, "{m}"),
            KvError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl From<std::io::Error> for KvError {
    fn from(e: std::io::Error) -> Self {
        KvError::Io(e)
    }
}

/// Longest accepted line.
const MAX_LINE: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum Cmd<'a> {
    Set(&'a str, &'a str),
    Get(&'a str),
}

/// Parse one request line; `None` for anything malformed.
pub fn parse(line: &str) -> Option<Cmd<'_>> {
    let mut it = line.split_ascii_whitespace();
    let cmd = match (it.next()?, it.next(), it.next()) {
        ("SET", Some(k), Some(v)) => Cmd::Set(k, v),
        ("GET", Some(k), None) => Cmd::Get(k),
        _ => return None,
    };
    it.next().is_none().then_some(cmd)
}

/// A connection to the replica, reopened after an error.
struct Replica {
    addr: SocketAddr,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
}

impl Replica {
    /// Send `SET k v` and wait for `OK` (one retry on a fresh connection).
    fn set(&mut self, k: &str, v: &str) -> Result<(), KvError> {
        for _ in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                self.conn = Some((BufReader::new(s.try_clone()?), s));
            }
            if let Some((r, w)) = self.conn.as_mut() {
                let mut line = String::new();
                let ok = writeln!(w, "SET {k} {v}").is_ok()
                    && r.read_line(&mut line).is_ok_and(|n| n > 0)
                    && line.trim() == "OK";
                if ok {
                    return Ok(());
                }
            }
            self.conn = None;
        }
        Err(KvError::Usage(format!(
            "replica {} did not take the write",
            self.addr
        )))
    }
}

type Table = Arc<Mutex<BTreeMap<String, String>>>;

/// Serve on `listen`; with `replica`, every SET is applied there first.
pub fn serve(listen: SocketAddr, replica: Option<SocketAddr>) -> Result<(), KvError> {
    let l = TcpListener::bind(listen)?;
    let table: Table = Arc::default();
    let replica = replica.map(|addr| Arc::new(Mutex::new(Replica { addr, conn: None })));
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let table = table.clone();
        let replica = replica.clone();
        std::thread::spawn(move || {
            let _ = session(s, &table, replica.as_deref());
        });
    }
    Ok(())
}

fn session(s: TcpStream, table: &Table, replica: Option<&Mutex<Replica>>) -> Result<(), KvError> {
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.by_ref().take(MAX_LINE as u64).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match parse(line.trim()) {
            Some(Cmd::Set(k, v)) => {
                // Replica first, then ours, then the ack: an acknowledged
                // write is on both.
                let rep = match replica {
                    Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()).set(k, v),
                    None => Ok(()),
                };
                match rep {
                    Ok(()) => {
                        table
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(k.to_string(), v.to_string());
                        "OK".to_string()
                    }
                    Err(e) => format!("ERR {e}"),
                }
            }
            Some(Cmd::Get(k)) => match table.lock().unwrap_or_else(|e| e.into_inner()).get(k) {
                Some(v) => format!("VAL {v}"),
                None => "NONE".to_string(),
            },
            None => "ERR bad request".to_string(),
        };
        writeln!(w, "{answer}")?;
    }
}

/// One request on a (re)connecting client; `None` on any failure.
fn request(
    conn: &mut Option<(BufReader<TcpStream>, TcpStream)>,
    addr: SocketAddr,
    req: &str,
) -> Option<String> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
        s.set_nodelay(true).ok()?;
        *conn = Some((BufReader::new(s.try_clone().ok()?), s));
    }
    let (r, w) = conn.as_mut()?;
    let mut line = String::new();
    let ok = writeln!(w, "{req}").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0);
    if !ok {
        *conn = None;
        return None;
    }
    Some(line.trim().to_string())
}

/// Write `key-N` = `N` for `duration` (reconnecting as needed), then read
/// back every acknowledged key for up to `verify_for`. Prints one JSON line
/// `{"acked":A,"attempts":T,"missing":M,"wrong":W,"unverified":U}`.
pub fn client(
    addr: SocketAddr,
    duration: Duration,
    verify_for: Duration,
) -> Result<String, KvError> {
    let mut conn = None;
    let mut acked: Vec<u64> = Vec::new();
    let mut attempts = 0u64;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < duration {
        attempts += 1;
        match request(&mut conn, addr, &format!("SET key-{n} {n}")) {
            Some(a) if a == "OK" => {
                acked.push(n);
                n += 1;
            }
            // Not acknowledged: the write may or may not be there; the
            // next one uses a fresh key.
            Some(_) => n += 1,
            None => {
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let (mut missing, mut wrong, mut unverified) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + verify_for;
    for k in &acked {
        let mut answer = None;
        while answer.is_none() && Instant::now() < deadline {
            answer = request(&mut conn, addr, &format!("GET key-{k}"));
            if answer.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        match answer {
            Some(a) if a == format!("VAL {k}") => {}
            Some(a) if a == "NONE" => missing += 1,
            Some(_) => wrong += 1,
            None => unverified += 1,
        }
    }
    Ok(format!(
        "{{\"acked\":{},\"attempts\":{attempts},\"missing\":{missing},\"wrong\":{wrong},\"unverified\":{unverified}}}",
        acked.len()
    ))
}

/// `kv --listen ADDR [--replica ADDR]` or `kv-client ADDR SECONDS`.
pub fn main(mode: &str, args: &[String]) -> Result<(), KvError> {
    let addr = |s: Option<&String>| -> Result<SocketAddr, KvError> {
        s.and_then(|s| s.parse().ok())
            .ok_or_else(|| KvError::Usage("expected an address like 10.0.1.5:7000".into()))
    };
    match mode {
        "kv" => {
            let mut listen = None;
            let mut replica = None;
            let mut it = args.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--listen" => listen = Some(addr(it.next())?),
                    "--replica" => replica = Some(addr(it.next())?),
                    other => return Err(KvError::Usage(format!("unknown argument {other}"))),
                }
            }
            let listen = listen.ok_or_else(|| KvError::Usage("kv needs --listen".into()))?;
            serve(listen, replica)
        }
        _ => {
            let server = addr(args.first())?;
            let secs: u64 = args
                .get(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| KvError::Usage("kv-client ADDR SECONDS".into()))?;
            let out = client(server, Duration::from_secs(secs), Duration::from_secs(30))?;
            println!("{out}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Option<Cmd<'_>>)] = &[
            ("SET a 1", Some(Cmd::Set("a", "1"))),
            ("GET a", Some(Cmd::Get("a"))),
            ("GET", None),
            ("SET a", None),
            ("SET a 1 2", None),
            ("GET a b", None),
            ("DEL a", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(&parse(line), want, "{line:?}");
        }
    }

    #[test]
    fn a_write_is_acked_only_after_the_replica_has_it() {
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let b_addr = b.local_addr().unwrap();
        drop(b);
        std::thread::spawn(move || serve(b_addr, None));
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        drop(a);
        std::thread::spawn(move || serve(a_addr, Some(b_addr)));
        std::thread::sleep(Duration::from_millis(200));
        let mut conn = None;
        assert_eq!(request(&mut conn, a_addr, "SET k 7").as_deref(), Some("OK"));
        // The replica has it on its own.
        let mut c2 = None;
        assert_eq!(request(&mut c2, b_addr, "GET k").as_deref(), Some("VAL 7"));
        assert_eq!(
            request(&mut conn, a_addr, "NOPE").as_deref(),
            Some("ERR bad request")
        );
        // A primary whose replica is gone refuses writes instead of acking.
        let c = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = c.local_addr().unwrap();
        drop(c);
        let p = TcpListener::bind("127.0.0.1:0").unwrap();
        let p_addr = p.local_addr().unwrap();
        drop(p);
        std::thread::spawn(move || serve(p_addr, Some(dead)));
        std::thread::sleep(Duration::from_millis(200));
        let mut c3 = None;
        let a = request(&mut c3, p_addr, "SET x 1").unwrap_or_default();
        assert!(a.starts_with("ERR"), "{a}");
    }
}
