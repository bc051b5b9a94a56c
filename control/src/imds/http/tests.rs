//! The server on loopback (no namespace needed): the protocol, tokens and
//! limits over real TCP connections.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::*;
use crate::imds::render::tests::{world, World, USER_DATA};
use crate::imds::testutil::{request, FakeSource};

fn server(tag: &str, limits: Limits) -> (World, Arc<FakeSource>, Server) {
    let w = world(tag);
    let source = FakeSource::new(w.lab.api.store.clone(), &w.instance);
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let s = Server::start(l, source.clone(), limits).unwrap();
    (w, source, s)
}

fn put_token(s: &Server, ttl: &str) -> String {
    let r = request(s.local_addr(), "PUT", TOKEN_PATH, &[(TTL_HEADER, ttl)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

#[test]
fn protocol_table() {
    let (w, _source, s) = server("proto", Limits::default());
    let token = put_token(&s, "60");
    let id = w.instance.as_str();
    let tok = token.as_str();
    // (method, path, headers, status, body when it matters)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        u16,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/latest/meta-data/instance-id",
            vec![],
            200,
            Some(id),
        ),
        (
            "GET",
            "/latest/meta-data/instance-id",
            vec![(TOKEN_HEADER, tok)],
            200,
            Some(id),
        ),
        (
            "GET",
            "/latest/meta-data/instance-id?x=1",
            vec![(TOKEN_HEADER, tok)],
            200,
            Some(id),
        ),
        (
            "GET",
            "/latest/meta-data/instance-id",
            vec![(TOKEN_HEADER, "AAAA")],
            401,
            None,
        ),
        (
            "GET",
            "/latest/meta-data/instance-id",
            vec![(TOKEN_HEADER, "")],
            401,
            None,
        ),
        ("GET", "/latest/meta-data/nothing", vec![], 404, None),
        (
            "GET",
            "/latest/meta-data/nothing",
            vec![(TOKEN_HEADER, tok)],
            404,
            None,
        ),
        ("POST", "/latest/meta-data/instance-id", vec![], 405, None),
        ("DELETE", "/latest/meta-data/", vec![], 405, None),
        ("GET", TOKEN_PATH, vec![(TTL_HEADER, "60")], 405, None),
        ("PUT", TOKEN_PATH, vec![], 400, None),
        ("PUT", TOKEN_PATH, vec![(TTL_HEADER, "0")], 400, None),
        ("PUT", TOKEN_PATH, vec![(TTL_HEADER, "21601")], 400, None),
        ("PUT", TOKEN_PATH, vec![(TTL_HEADER, "abc")], 400, None),
        (
            "PUT",
            TOKEN_PATH,
            vec![(TTL_HEADER, "60"), ("X-Forwarded-For", "10.0.0.9")],
            403,
            None,
        ),
        (
            "HEAD",
            "/latest/meta-data/instance-id",
            vec![],
            200,
            Some(""),
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, headers, status, body) in &cases {
        let r = request(s.local_addr(), method, path, headers).unwrap();
        if r.status != *status || body.is_some_and(|b| r.text() != b) {
            failures.push(format!(
                "{method} {path} {headers:?}: {} {:?}",
                r.status,
                r.text()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let st = s.stats();
    assert_eq!(st.tokens, 1);
    assert_eq!(st.unauthorized, 2);
    assert_eq!(st.not_found, 2);
    assert_eq!(st.forbidden, 1);
    assert_eq!(st.bad_requests, 7);
    assert_eq!(st.v2, 3, "{st:?}");
    assert_eq!(st.v1, 3, "{st:?}");
    assert_eq!(st.requests, cases.len() as u64 + 1);
}

#[test]
fn token_answer_echoes_the_ttl_and_types_are_right() {
    let (_w, _source, s) = server("types", Limits::default());
    let r = request(s.local_addr(), "PUT", TOKEN_PATH, &[(TTL_HEADER, "21600")]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header(TTL_HEADER), Some("21600"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let token = r.text();
    let ud = request(
        s.local_addr(),
        "GET",
        "/latest/user-data",
        &[(TOKEN_HEADER, &token)],
    )
    .unwrap();
    assert_eq!(ud.status, 200);
    assert_eq!(ud.body, USER_DATA);
    assert_eq!(ud.header("content-type"), Some("application/octet-stream"));
    let doc = request(
        s.local_addr(),
        "GET",
        "/latest/dynamic/instance-identity/document",
        &[],
    )
    .unwrap();
    assert_eq!(doc.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&doc.body).unwrap();
    assert!(v["instanceId"].is_string());
}

#[test]
fn tokens_are_bound_to_their_instance_and_expire() {
    let (w, source, s) = server("bound", Limits::default());
    let token = put_token(&s, "1");
    let path = "/latest/meta-data/instance-id";
    let ok = request(s.local_addr(), "GET", path, &[(TOKEN_HEADER, &token)]).unwrap();
    assert_eq!(ok.status, 200);
    // The same client address now belongs to another instance.
    source.set(Some("i-0000000000000beef"));
    let r = request(s.local_addr(), "GET", path, &[(TOKEN_HEADER, &token)]).unwrap();
    assert_eq!(r.status, 401);
    // An address that belongs to no instance gets nothing at all.
    source.set(None);
    let r = request(s.local_addr(), "GET", path, &[]).unwrap();
    assert_eq!(r.status, 403);
    let r = request(s.local_addr(), "PUT", TOKEN_PATH, &[(TTL_HEADER, "60")]).unwrap();
    assert_eq!(r.status, 403);
    source.set(Some(&w.instance));
    std::thread::sleep(Duration::from_millis(1100));
    let r = request(s.local_addr(), "GET", path, &[(TOKEN_HEADER, &token)]).unwrap();
    assert_eq!(r.status, 401, "an expired token");
    // The server saw the real client address.
    assert!(source
        .asked
        .lock()
        .unwrap()
        .iter()
        .all(|a| *a == Ipv4Addr::LOCALHOST));
}

/// Reads until the peer closes; the time it took.
fn wait_closed(mut c: TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    c.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t.elapsed(),
            Err(e) => panic!("not closed within {limit:?}: {e}"),
        }
    }
}

#[test]
fn connections_are_bounded_per_client() {
    let limits = Limits {
        max_connections_per_client: 3,
        ..Limits::default()
    };
    let (_w, _source, s) = server("bounded", limits);
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(s.local_addr()).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.open_connections() < 3 {
        assert!(Instant::now() < deadline, "connections not accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The fourth is closed at once, without an answer.
    let extra = TcpStream::connect(s.local_addr()).unwrap();
    assert!(wait_closed(extra, Duration::from_secs(2)) < Duration::from_secs(2));
    assert_eq!(s.stats().refused, 1);
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.open_connections() > 0 {
        assert!(Instant::now() < deadline, "slots not given back");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = request(s.local_addr(), "GET", "/latest/meta-data/", &[]).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn slow_and_oversized_requests_are_cut_off() {
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        connection_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (_w, _source, s) = server("slow", limits);
    // Headers that never finish.
    let mut c = TcpStream::connect(s.local_addr()).unwrap();
    std::io::Write::write_all(&mut c, b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let took = wait_closed(c, Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // A connection that says nothing at all.
    let c = TcpStream::connect(s.local_addr()).unwrap();
    let took = wait_closed(c, Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // Headers over the limit.
    let big = "a".repeat(Limits::default().max_header_bytes + 100);
    let r = request(
        s.local_addr(),
        "GET",
        "/latest/meta-data/",
        &[("X-Big", &big)],
    )
    .unwrap();
    assert_eq!(r.status, 431);
    // Still serving.
    let r = request(s.local_addr(), "GET", "/latest/meta-data/", &[]).unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn garbage_does_not_hurt_the_server() {
    let (_w, _source, s) = server("garbage", Limits::default());
    for junk in [
        &b"\x00\x01\x02\xff\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /latest/meta-data/ HTTP/9.9\r\n\r\n",
        b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: \xff\r\n\r\n",
        b"GET /latest/meta-data/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut c = TcpStream::connect(s.local_addr()).unwrap();
        std::io::Write::write_all(&mut c, junk).unwrap();
        wait_closed(c, Duration::from_secs(10));
    }
    let r = request(
        s.local_addr(),
        "GET",
        "/latest/meta-data/instance-type",
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "m5.large");
}

#[test]
fn stopping_closes_the_listener() {
    let (_w, _source, s) = server("stop", Limits::default());
    let addr = s.local_addr();
    let idle = TcpStream::connect(addr).unwrap();
    drop(s);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    wait_closed(idle, Duration::from_secs(5));
}
