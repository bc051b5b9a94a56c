//! The real serve loop over a socketpair: no VM needed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use enilab_agent::proto::{self, Bytes};
use enilab_agent::{serve, ExecRequest, Hello, Message, Request, ServeOptions, Stream};

struct Host {
    r: BufReader<UnixStream>,
    w: UnixStream,
    agent: Option<JoinHandle<std::io::Result<()>>>,
}

fn start() -> Host {
    let (host, guest) = UnixStream::pair().unwrap();
    let opts = ServeOptions {
        reconnectable: false,
        heartbeat: Duration::from_millis(200),
        hello: Arc::new(|| Hello {
            version: "test".into(),
            protocol: proto::PROTOCOL_VERSION,
            hostname: "testhost".into(),
            boot_ms: 1,
            ..Default::default()
        }),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let agent = std::thread::spawn(move || serve(guest.into(), opts));
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Host {
        r: BufReader::new(host.try_clone().unwrap()),
        w: host,
        agent: Some(agent),
    }
}

impl Host {
    fn send(&mut self, r: &Request) {
        self.w.write_all(&proto::encode_line(r)).unwrap();
    }

    fn raw(&mut self, line: &[u8]) {
        self.w.write_all(line).unwrap();
    }

    /// Next message, heartbeats included.
    fn recv_any(&mut self) -> Message {
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .expect("agent reply within 10 s");
            assert!(n > 0, "agent closed the connection");
            if line.trim().is_empty() {
                continue;
            }
            return proto::decode_line(line.as_bytes()).unwrap();
        }
    }

    /// Next message that is not a heartbeat.
    fn recv(&mut self) -> Message {
        loop {
            match self.recv_any() {
                Message::Heartbeat { .. } => continue,
                m => return m,
            }
        }
    }

    fn hello(&mut self) -> Hello {
        match self.recv() {
            Message::Hello(h) => h,
            m => panic!("expected hello first, got {m:?}"),
        }
    }

    /// Collects an exec's output until its final message.
    fn collect(&mut self, id: u64) -> (Vec<u8>, Vec<u8>, Message) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let m = self.recv();
            assert_eq!(m.id(), Some(id), "unexpected {m:?}");
            match m {
                Message::Output {
                    stream: Stream::Stdout,
                    data,
                    ..
                } => out.extend(data.0),
                Message::Output {
                    stream: Stream::Stderr,
                    data,
                    ..
                } => err.extend(data.0),
                m => return (out, err, m),
            }
        }
    }
}

fn exec(id: u64, argv: &[&str]) -> ExecRequest {
    ExecRequest {
        id,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn hello_then_ping() {
    let mut h = start();
    let hello = h.hello();
    assert_eq!(hello.hostname, "testhost");
    assert_eq!(hello.id, None);
    h.send(&Request::Ping { id: 42 });
    assert!(matches!(h.recv(), Message::Pong { id: 42, .. }));
    h.send(&Request::Hello { id: 43 });
    match h.recv() {
        Message::Hello(x) => assert_eq!(x.id, Some(43)),
        m => panic!("{m:?}"),
    }
}

#[test]
fn exec_captures_both_streams_and_the_code() {
    let mut h = start();
    h.hello();
    h.send(&Request::Exec(exec(
        1,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    )));
    let (out, err, fin) = h.collect(1);
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(
        fin,
        Message::Exit {
            id: 1,
            code: 3,
            signal: None,
            timed_out: false
        }
    );
}

#[test]
fn exec_feeds_stdin_env_and_cwd() {
    let mut h = start();
    h.hello();
    let mut env = BTreeMap::new();
    env.insert("ENILAB_T".to_string(), "v1".to_string());
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    h.send(&Request::Exec(ExecRequest {
        id: 2,
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo $ENILAB_T $(pwd) >&2; cat".into(),
        ],
        env,
        cwd: Some("/tmp".into()),
        stdin: Some(Bytes(big.clone())),
        timeout_ms: Some(20_000),
    }));
    let (out, err, fin) = h.collect(2);
    assert_eq!(err, b"v1 /tmp\n");
    assert_eq!(out.len(), big.len());
    assert!(out == big, "stdin came back altered");
    assert!(matches!(fin, Message::Exit { code: 0, .. }));
}

#[test]
fn output_is_streamed_before_exit() {
    let mut h = start();
    h.hello();
    let t0 = Instant::now();
    h.send(&Request::Exec(exec(
        3,
        &["sh", "-c", "echo first; sleep 1; echo second"],
    )));
    match h.recv() {
        Message::Output { id: 3, data, .. } => assert_eq!(data.0, b"first\n"),
        m => panic!("{m:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "first chunk took {:?}",
        t0.elapsed()
    );
    let (out, _, fin) = h.collect(3);
    assert_eq!(out, b"second\n");
    assert!(matches!(fin, Message::Exit { code: 0, .. }));
    assert!(t0.elapsed() >= Duration::from_secs(1));
}

#[test]
fn timeout_kills_the_process_group() {
    let mut h = start();
    h.hello();
    let t0 = Instant::now();
    let mut e = exec(4, &["sh", "-c", "sleep 30 & sleep 30"]);
    e.timeout_ms = Some(300);
    h.send(&Request::Exec(e));
    let (_, _, fin) = h.collect(4);
    assert_eq!(
        fin,
        Message::Exit {
            id: 4,
            code: 137,
            signal: Some(9),
            timed_out: true
        }
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn cancel_kills_a_running_exec() {
    let mut h = start();
    h.hello();
    h.send(&Request::Exec(exec(5, &["sleep", "30"])));
    std::thread::sleep(Duration::from_millis(200));
    h.send(&Request::Cancel {
        id: 6,
        target: 5,
        signal: None,
    });
    let mut got_ok = false;
    let mut got_exit = false;
    while !(got_ok && got_exit) {
        match h.recv() {
            Message::Ok { id: 6 } => got_ok = true,
            Message::Exit {
                id: 5,
                signal: Some(9),
                timed_out: false,
                ..
            } => got_exit = true,
            m => panic!("{m:?}"),
        }
    }
    h.send(&Request::Cancel {
        id: 7,
        target: 5,
        signal: None,
    });
    assert!(matches!(h.recv(), Message::Error { id: Some(7), .. }));
}

#[test]
fn concurrent_execs_overlap() {
    let mut h = start();
    h.hello();
    let t0 = Instant::now();
    for id in 10..14 {
        h.send(&Request::Exec(exec(
            id,
            &["sh", "-c", "sleep 0.6; echo done"],
        )));
    }
    let mut exits = 0;
    while exits < 4 {
        if let Message::Exit { code: 0, .. } = h.recv() {
            exits += 1;
        }
    }
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "execs ran serially: {:?}",
        t0.elapsed()
    );
}

#[test]
fn background_children_do_not_hold_the_exec() {
    let mut h = start();
    h.hello();
    let t0 = Instant::now();
    h.send(&Request::Exec(exec(
        20,
        &["sh", "-c", "sleep 5 & echo started"],
    )));
    let (out, _, fin) = h.collect(20);
    assert_eq!(out, b"started\n");
    assert!(matches!(fin, Message::Exit { code: 0, .. }));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn spawn_errors_and_malformed_lines_get_errors_and_the_loop_goes_on() {
    let mut h = start();
    h.hello();
    h.send(&Request::Exec(exec(30, &["/nonexistent/enilab-binary"])));
    match h.recv() {
        Message::Error {
            id: Some(30),
            message,
        } => assert!(message.contains("cannot execute"), "{message}"),
        m => panic!("{m:?}"),
    }
    h.raw(b"this is not json\n");
    assert!(matches!(h.recv(), Message::Error { id: None, .. }));
    h.raw(b"{\"type\":\"exec\",\"id\":31}\n");
    assert!(matches!(h.recv(), Message::Error { id: Some(31), .. }));
    h.raw(b"{\"type\":\"frobnicate\",\"id\":32}\n");
    assert!(matches!(h.recv(), Message::Error { id: Some(32), .. }));
    h.raw(b"\xff\xfe\x00\n");
    assert!(matches!(h.recv(), Message::Error { id: None, .. }));
    h.send(&Request::Exec(exec(33, &[])));
    assert!(matches!(h.recv(), Message::Error { id: Some(33), .. }));
    h.send(&Request::Status { id: 34 });
    assert!(matches!(h.recv(), Message::Error { id: Some(34), .. }));
    h.send(&Request::Ping { id: 35 });
    assert!(matches!(h.recv(), Message::Pong { id: 35, .. }));
}

#[test]
fn files_roundtrip() {
    let mut h = start();
    h.hello();
    let dir = std::env::temp_dir().join(format!("enilab-agent-files-{}", std::process::id()));
    let path = dir.join("sub/dir/f.bin").to_string_lossy().into_owned();
    let data: Vec<u8> = (0..=255u8).collect();
    h.send(&Request::WriteFile {
        id: 40,
        path: path.clone(),
        data: Bytes(data.clone()),
        mode: Some(0o640),
    });
    assert_eq!(h.recv(), Message::Ok { id: 40 });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    h.send(&Request::ReadFile {
        id: 41,
        path: path.clone(),
    });
    assert_eq!(
        h.recv(),
        Message::File {
            id: 41,
            data: Bytes(data)
        }
    );
    h.send(&Request::ReadFile {
        id: 42,
        path: dir.join("missing").to_string_lossy().into_owned(),
    });
    assert!(matches!(h.recv(), Message::Error { id: Some(42), .. }));
    h.send(&Request::ReadFile {
        id: 43,
        path: "/proc/self/status".into(),
    });
    match h.recv() {
        Message::File { id: 43, data } => assert!(data.0.starts_with(b"Name:")),
        m => panic!("{m:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn heartbeats_flow() {
    let mut h = start();
    h.hello();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        if let Message::Heartbeat { seq, .. } = h.recv_any() {
            seqs.push(seq);
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
}

#[test]
fn closing_the_host_end_stops_the_loop_and_kills_execs() {
    let mut h = start();
    h.hello();
    let marker = format!("/tmp/enilab-agent-kill-{}", std::process::id());
    h.send(&Request::Exec(exec(
        50,
        &["sh", "-c", &format!("sleep 1; touch {marker}")],
    )));
    std::thread::sleep(Duration::from_millis(200));
    let agent = h.agent.take().unwrap();
    drop(h);
    agent.join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !std::path::Path::new(&marker).exists(),
        "exec survived the disconnect"
    );
}
