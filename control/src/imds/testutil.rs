//! Test helpers: a metadata source over a real store, and a minimal HTTP
//! client that speaks to the server over a real TCP connection.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::MetadataSource;
use crate::store::{State, Store};

/// Answers every client with one instance (or none), switchable.
pub struct FakeSource {
    pub store: Arc<Store>,
    pub instance: Mutex<Option<String>>,
    /// Client addresses asked about, in order.
    pub asked: Mutex<Vec<Ipv4Addr>>,
}

impl FakeSource {
    pub fn new(store: Arc<Store>, instance: &str) -> Arc<FakeSource> {
        Arc::new(FakeSource {
            store,
            instance: Mutex::new(Some(instance.to_string())),
            asked: Mutex::default(),
        })
    }

    pub fn set(&self, instance: Option<&str>) {
        *self.instance.lock().unwrap() = instance.map(String::from);
    }
}

impl MetadataSource for FakeSource {
    fn instance_of(&self, client: Ipv4Addr) -> Option<String> {
        self.asked.lock().unwrap().push(client);
        self.instance.lock().unwrap().clone()
    }

    fn with_state(&self, f: &mut dyn FnMut(&State)) {
        self.store.read(|st| f(st));
    }
}

#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parse a whole `Connection: close` response.
pub fn parse_reply(raw: &[u8]) -> io::Result<HttpReply> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(bad)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// One request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpReply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    request_on(&mut s, method, path, headers)
}

pub fn request_on(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpReply> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_reply(&raw)
}
