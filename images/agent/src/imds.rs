//! A minimal instance metadata client: HTTP/1.1 over a fresh `TcpStream`
//! per request, IMDSv2 with a session token renewed before it expires,
//! IMDSv1 when no token can be had.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Where EC2's metadata service answers.
pub const IMDS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);
/// The token lifetime asked for (EC2's maximum).
pub const TOKEN_TTL: Duration = Duration::from_secs(21_600);
/// A token this close to its expiry is replaced.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// After a failed token request, IMDSv1 is used this long before retrying.
const V1_BACKOFF: Duration = Duration::from_secs(60);
/// Responses larger than this are refused.
const MAX_RESPONSE: u64 = 256 * 1024;

/// Why a metadata request failed.
#[derive(Debug)]
pub enum ImdsError {
    Connect(io::Error),
    Io(io::Error),
    /// Not an HTTP response we understand.
    Malformed,
    TooLarge,
    /// An HTTP status other than 200 and 404.
    Status(u16),
}

impl std::fmt::Display for ImdsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImdsError::Connect(e) => write!(f, "cannot connect to the metadata service: {e}"),
            ImdsError::Io(e) => write!(f, "metadata request failed: {e}"),
            ImdsError::Malformed => write!(f, "malformed metadata response"),
            ImdsError::TooLarge => write!(f, "metadata response over {MAX_RESPONSE} bytes"),
            ImdsError::Status(s) => write!(f, "metadata service answered HTTP {s}"),
        }
    }
}

impl std::error::Error for ImdsError {}

/// A parsed response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Parse a complete `Connection: close` response (a body delimited by
/// Content-Length when there is one, else by the end of the stream).
pub fn parse_response(raw: &[u8]) -> Result<Response, ImdsError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ImdsError::Malformed)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| ImdsError::Malformed)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(ImdsError::Malformed)?;
    let mut parts = status_line.split(' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(ImdsError::Malformed);
    }
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .ok_or(ImdsError::Malformed)?;
    let mut length: Option<usize> = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse().map_err(|_| ImdsError::Malformed)?);
            }
        }
    }
    let body = raw.get(end + 4..).ok_or(ImdsError::Malformed)?;
    let body = match length {
        Some(n) => body.get(..n).ok_or(ImdsError::Malformed)?,
        None => body,
    };
    Ok(Response {
        status,
        body: body.to_vec(),
    })
}

/// One request on a new connection.
pub fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response, ImdsError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(ImdsError::Connect)?;
    s.set_read_timeout(Some(timeout)).map_err(ImdsError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(ImdsError::Io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        addr.ip()
    );
    for (k, v) in headers {
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    if method == "PUT" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(ImdsError::Io)?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .map_err(ImdsError::Io)?;
    if raw.len() as u64 > MAX_RESPONSE {
        return Err(ImdsError::TooLarge);
    }
    parse_response(&raw)
}

/// The client: remembers its token between requests.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    token: Option<(String, Instant)>,
    /// No token request before this (the last one failed).
    v1_until: Option<Instant>,
}

impl Client {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            addr,
            timeout,
            token: None,
            v1_until: None,
        }
    }

    /// Whether requests currently carry a token.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn refresh_token(&mut self, now: Instant) {
        let fresh = self
            .token
            .as_ref()
            .is_some_and(|(_, exp)| now + RENEW_BEFORE < *exp);
        if fresh || self.v1_until.is_some_and(|t| now < t) {
            return;
        }
        let ttl = TOKEN_TTL.as_secs().to_string();
        match exchange(
            self.addr,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)],
            self.timeout,
        ) {
            Ok(r) if r.status == 200 && !r.body.is_empty() && r.body.len() <= 4096 => {
                match String::from_utf8(r.body) {
                    Ok(t) if t.bytes().all(|b| b.is_ascii_graphic()) => {
                        self.token = Some((t, now + TOKEN_TTL));
                        self.v1_until = None;
                        return;
                    }
                    _ => {}
                }
            }
            // Not reachable (yet: no route before DHCP): the next request
            // asks again rather than settling for IMDSv1.
            Err(ImdsError::Connect(_) | ImdsError::Io(_)) => {
                self.token = None;
                return;
            }
            _ => {}
        }
        // The service answered but gave no token: IMDSv1 for a while.
        self.token = None;
        self.v1_until = Some(now + V1_BACKOFF);
    }

    /// GET `path`: the body, `None` on 404.
    pub fn get(&mut self, path: &str) -> Result<Option<String>, ImdsError> {
        self.refresh_token(Instant::now());
        let r = self.get_once(path)?;
        let r = if r.status == 401 && self.token.is_some() {
            // The token was refused (the service restarted): a new one.
            self.token = None;
            self.v1_until = None;
            self.refresh_token(Instant::now());
            self.get_once(path)?
        } else {
            r
        };
        match r.status {
            200 => Ok(Some(String::from_utf8_lossy(&r.body).into_owned())),
            404 => Ok(None),
            s => Err(ImdsError::Status(s)),
        }
    }

    fn get_once(&self, path: &str) -> Result<Response, ImdsError> {
        match &self.token {
            Some((t, _)) => exchange(
                self.addr,
                "GET",
                path,
                &[("X-aws-ec2-metadata-token", t)],
                self.timeout,
            ),
            None => exchange(self.addr, "GET", path, &[], self.timeout),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"abc".to_vec()
            }
        );
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"nope");
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0 x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 \xff OK\r\n\r\n",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }

    /// A fake service: answers from `reply(method, path, token)`; records
    /// each request's first line and token.
    #[allow(clippy::type_complexity)]
    pub(crate) fn fake(
        reply: impl Fn(&str, &str, Option<&str>) -> (u16, String) + Send + 'static,
    ) -> (SocketAddr, Arc<Mutex<Vec<(String, Option<String>)>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = Vec::new();
                let mut b = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let first = text.lines().next().unwrap_or("").to_string();
                let token = text
                    .lines()
                    .find_map(|l| l.strip_prefix("X-aws-ec2-metadata-token: "))
                    .map(String::from);
                let mut parts = first.split(' ');
                let (m, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, body) = reply(m, p, token.as_deref());
                log2.lock().unwrap().push((first.clone(), token));
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (addr, log)
    }

    #[test]
    fn uses_a_token_and_renews_it_when_refused() {
        let issued = Arc::new(Mutex::new(0u32));
        let i2 = issued.clone();
        let (addr, log) = fake(move |m, p, tok| match (m, p) {
            ("PUT", "/latest/api/token") => {
                let mut n = i2.lock().unwrap();
                *n += 1;
                (200, format!("tok{n}"))
            }
            // Only the second token is accepted (a service restart).
            (_, "/x") if tok == Some("tok2") => (200, "v".into()),
            (_, "/x") => (401, String::new()),
            _ => (404, String::new()),
        });
        let mut c = Client::new(addr, Duration::from_secs(2));
        assert_eq!(c.get("/x").unwrap(), Some("v".into()));
        assert!(c.has_token());
        assert_eq!(c.get("/missing").unwrap(), None);
        let log = log.lock().unwrap();
        let firsts: Vec<&str> = log.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            firsts,
            [
                "PUT /latest/api/token HTTP/1.1",
                "GET /x HTTP/1.1",
                "PUT /latest/api/token HTTP/1.1",
                "GET /x HTTP/1.1",
                "GET /missing HTTP/1.1",
            ]
        );
        assert_eq!(log[4].1.as_deref(), Some("tok2"), "the token is reused");
    }

    #[test]
    fn falls_back_to_v1_without_tokens() {
        let (addr, log) = fake(|m, p, _| match (m, p) {
            ("PUT", _) => (403, String::new()),
            (_, "/x") => (200, "v1".into()),
            _ => (500, String::new()),
        });
        let mut c = Client::new(addr, Duration::from_secs(2));
        assert_eq!(c.get("/x").unwrap(), Some("v1".into()));
        assert_eq!(c.get("/x").unwrap(), Some("v1".into()));
        assert!(!c.has_token());
        assert!(matches!(c.get("/y"), Err(ImdsError::Status(500))));
        let log = log.lock().unwrap();
        // One token attempt, then IMDSv1 without retrying it every time.
        assert_eq!(log.iter().filter(|(f, _)| f.starts_with("PUT")).count(), 1);
        assert!(log.iter().all(|(_, t)| t.is_none()));
    }

    #[test]
    fn an_unreachable_service_is_asked_for_a_token_again() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut c = Client::new(addr, Duration::from_millis(500));
        assert!(matches!(c.get("/x"), Err(ImdsError::Connect(_))));
        // The service comes up on that address (as after DHCP).
        let l = TcpListener::bind(addr).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let body = if req.starts_with("PUT") { "tok" } else { "v2" };
                let _ = tx.send(req);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        assert_eq!(c.get("/x").unwrap(), Some("v2".into()));
        assert!(rx.recv().unwrap().starts_with("PUT /latest/api/token"));
        assert!(rx
            .recv()
            .unwrap()
            .contains("X-aws-ec2-metadata-token: tok\r\n"));
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut c = Client::new(addr, Duration::from_millis(500));
        assert!(matches!(c.get("/x"), Err(ImdsError::Connect(_))));
    }
}
