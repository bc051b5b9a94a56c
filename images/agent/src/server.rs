//! The agent's serve loop. It runs over any pollable descriptor (the
//! virtio-serial port in the guest, one end of a socketpair in tests).
//!
//! Threads: the caller's thread reads and dispatches requests; one writer
//! thread drains the outbound queue; one heartbeat thread; one thread per
//! exec (plus a short-lived stdin feeder) and per file request.
//!
//! Sessions: a "session" is one connection of the host to the port. When the
//! host disconnects the agent kills every exec of that session and discards
//! what was queued for it; when a host connects it sends `hello` first.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::proto::{
    self, Bytes, ExecRequest, Hello, Line, LineBuffer, Message, Request, Stream, MAX_FILE,
};
use crate::sys;

/// Queue size above which exec output waits (backpressure on the process).
const QUEUE_HIGH: usize = 4 << 20;
/// Queue size above which heartbeats are dropped instead of queued.
const HEARTBEAT_DROP: usize = 256 << 10;
/// How long an exec keeps its result open after the process exited while
/// descendants still hold its stdout/stderr.
const LINGER: Duration = Duration::from_millis(200);

/// How [`serve`] behaves.
#[derive(Clone)]
pub struct ServeOptions {
    /// End of file on the descriptor means "the host went away, wait for the
    /// next one" (virtio-serial) instead of "done" (sockets, tests).
    pub reconnectable: bool,
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Builds the hello sent on connection and on request.
    pub hello: Arc<dyn Fn() -> Hello + Send + Sync>,
    /// Set to make `serve` return (checked a few times a second).
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("reconnectable", &self.reconnectable)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        let boot_ms = sys::uptime_ms();
        ServeOptions {
            reconnectable: false,
            heartbeat: Duration::from_secs(1),
            hello: Arc::new(move || crate::guest::system_hello(boot_ms)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Control block of one running exec.
struct ExecCtl {
    /// Process group id once spawned (0 before).
    pgid: AtomicI32,
    /// Signal requested by `cancel` or a disconnect (0: none).
    kill: AtomicI32,
}

impl ExecCtl {
    fn signal(&self, sig: i32) {
        self.kill.store(sig, Ordering::SeqCst);
        sys::kill_group(self.pgid.load(Ordering::SeqCst), sig);
    }
}

#[derive(Default)]
struct Out {
    queue: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Session generation; bumped on every connect and disconnect.
    gen: u64,
    link_up: bool,
    stopped: bool,
}

struct Shared {
    out: Mutex<Out>,
    cv: Condvar,
    execs: Mutex<HashMap<u64, Arc<ExecCtl>>>,
    opts: ServeOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Queues `msg` for session `gen`. With `wait`, blocks while the queue
    /// is over its high mark. Returns false when the session is over.
    fn send(&self, gen: u64, msg: &Message, wait: bool) -> bool {
        let line = proto::encode_line(msg);
        let mut out = lock(&self.out);
        loop {
            if out.stopped || out.gen != gen || !out.link_up {
                return false;
            }
            if !wait || out.bytes < QUEUE_HIGH {
                break;
            }
            out = self.cv.wait(out).unwrap_or_else(|p| p.into_inner());
        }
        out.bytes += line.len();
        out.queue.push_back((gen, line));
        self.cv.notify_all();
        true
    }

    fn heartbeat(&self, seq: u64) {
        let mut out = lock(&self.out);
        if out.link_up && out.bytes < HEARTBEAT_DROP {
            let line = proto::encode_line(&Message::Heartbeat {
                seq,
                uptime_ms: sys::uptime_ms(),
            });
            out.bytes += line.len();
            let gen = out.gen;
            out.queue.push_back((gen, line));
            self.cv.notify_all();
        }
    }

    /// A host connected: new session, hello first.
    fn connected(&self) -> u64 {
        let hello = Message::Hello((self.opts.hello)());
        let mut line = b"\n".to_vec(); // terminates any line a previous session cut short
        line.extend(proto::encode_line(&hello));
        let mut out = lock(&self.out);
        out.gen += 1;
        out.link_up = true;
        out.queue.clear();
        out.bytes = line.len();
        let gen = out.gen;
        out.queue.push_back((gen, line));
        self.cv.notify_all();
        gen
    }

    /// The host went away: end the session, kill its execs.
    fn disconnected(&self) {
        {
            let mut out = lock(&self.out);
            out.gen += 1;
            out.link_up = false;
            out.queue.clear();
            out.bytes = 0;
            self.cv.notify_all();
        }
        for ctl in lock(&self.execs).values() {
            ctl.signal(libc::SIGKILL);
        }
    }

    fn stop(&self) {
        let mut out = lock(&self.out);
        out.stopped = true;
        self.cv.notify_all();
    }
}

/// Serves the agent protocol on `fd` (read and written) until the peer
/// closes it (when not `reconnectable`) or `opts.stop` is set.
pub fn serve(fd: OwnedFd, opts: ServeOptions) -> io::Result<()> {
    sys::set_nonblocking(&fd)?;
    let fd = Arc::new(fd);
    let shared = Arc::new(Shared {
        out: Mutex::new(Out::default()),
        cv: Condvar::new(),
        execs: Mutex::new(HashMap::new()),
        opts: opts.clone(),
    });

    let writer = {
        let (shared, fd) = (shared.clone(), fd.clone());
        thread::Builder::new()
            .name("agent-writer".into())
            .spawn(move || writer_loop(&shared, &fd))?
    };
    let heart = {
        let shared = shared.clone();
        thread::Builder::new()
            .name("agent-heartbeat".into())
            .spawn(move || {
                let mut seq = 0u64;
                loop {
                    let deadline = Instant::now() + shared.opts.heartbeat;
                    let mut out = lock(&shared.out);
                    while !out.stopped && Instant::now() < deadline {
                        let left = deadline.saturating_duration_since(Instant::now());
                        out = shared
                            .cv
                            .wait_timeout(out, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    if out.stopped {
                        return;
                    }
                    drop(out);
                    seq += 1;
                    shared.heartbeat(seq);
                }
            })?
    };

    let result = reader_loop(&shared, &fd);
    shared.disconnected();
    shared.stop();
    let _ = writer.join();
    let _ = heart.join();
    result
}

fn reader_loop(shared: &Arc<Shared>, fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let mut lines = LineBuffer::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut gen: Option<u64> = None; // Some while a host is connected
    loop {
        if shared.opts.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut p = [sys::pollfd(raw, libc::POLLIN)];
        let wait = if gen.is_some() {
            Duration::from_millis(250)
        } else {
            Duration::ZERO
        };
        sys::poll(&mut p, wait)?;
        let rev = p[0].revents;
        let hup = rev & (libc::POLLHUP | libc::POLLERR) != 0;
        if !hup && gen.is_none() {
            gen = Some(shared.connected());
        }
        let mut eof = false;
        if rev & libc::POLLIN != 0 {
            loop {
                match sys::read(raw, &mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        let g = match gen {
                            Some(g) => g,
                            None => *gen.insert(shared.connected()),
                        };
                        for line in lines.push(&buf[..n]) {
                            handle_line(shared, g, line);
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_disconnect(&e) => {
                        eof = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        } else if hup {
            eof = true;
        }
        if eof {
            if gen.take().is_some() {
                shared.disconnected();
                lines.clear();
            }
            if !shared.opts.reconnectable {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENODEV | libc::ENOTCONN)
    )
}

fn writer_loop(shared: &Shared, fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    loop {
        let (gen, line) = {
            let mut out = lock(&shared.out);
            loop {
                if out.stopped {
                    return;
                }
                if let Some(item) = out.queue.pop_front() {
                    out.bytes -= item.1.len();
                    shared.cv.notify_all();
                    break item;
                }
                out = shared.cv.wait(out).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut off = 0;
        while off < line.len() {
            match sys::write(raw, &line[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = [sys::pollfd(raw, libc::POLLOUT)];
                    let _ = sys::poll(&mut p, Duration::from_millis(200));
                    let out = lock(&shared.out);
                    if out.stopped || out.gen != gen {
                        break; // session over: drop the rest
                    }
                    drop(out);
                    if p[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
                        && p[0].revents & libc::POLLOUT == 0
                    {
                        // Host gone mid-line; the reader notices and ends the session.
                        break;
                    }
                }
                Err(_) => break, // EPIPE, ENODEV...: the message is lost with the session
            }
        }
    }
}

fn handle_line(shared: &Arc<Shared>, gen: u64, line: Line) {
    let line = match line {
        Line::Complete(l) => l,
        Line::TooLong => {
            let message = format!(
                "request line longer than {} bytes, ignored",
                proto::MAX_LINE
            );
            shared.send(gen, &Message::Error { id: None, message }, false);
            return;
        }
    };
    let req: Request = match proto::decode_line(&line) {
        Ok(r) => r,
        Err(e) => {
            shared.send(
                gen,
                &Message::Error {
                    id: e.id,
                    message: e.message,
                },
                false,
            );
            return;
        }
    };
    match req {
        Request::Ping { id } => {
            shared.send(
                gen,
                &Message::Pong {
                    id,
                    uptime_ms: sys::uptime_ms(),
                },
                false,
            );
        }
        Request::Hello { id } => {
            let mut h = (shared.opts.hello)();
            h.id = Some(id);
            shared.send(gen, &Message::Hello(h), false);
        }
        Request::Reconcile { id } => {
            crate::eni::nudge();
            shared.send(gen, &Message::Ok { id }, false);
        }
        Request::Status { id } => {
            let message = "status is answered by the host mux, not the guest agent".to_string();
            shared.send(
                gen,
                &Message::Error {
                    id: Some(id),
                    message,
                },
                false,
            );
        }
        Request::Cancel { id, target, signal } => {
            let ctl = lock(&shared.execs).get(&target).cloned();
            let msg = match ctl {
                Some(ctl) => {
                    ctl.signal(signal.unwrap_or(libc::SIGKILL));
                    Message::Ok { id }
                }
                None => Message::Error {
                    id: Some(id),
                    message: format!("no running exec with id {target}"),
                },
            };
            shared.send(gen, &msg, false);
        }
        Request::Exec(req) => start_exec(shared, gen, req),
        Request::WriteFile {
            id,
            path,
            data,
            mode,
        } => {
            let sh = shared.clone();
            spawn_or_report(shared, gen, id, move || {
                let msg = match write_file(&path, &data.0, mode) {
                    Ok(()) => Message::Ok { id },
                    Err(e) => Message::Error {
                        id: Some(id),
                        message: format!("write_file {path}: {e}"),
                    },
                };
                sh.send(gen, &msg, true);
            });
        }
        Request::ReadFile { id, path } => {
            let sh = shared.clone();
            spawn_or_report(shared, gen, id, move || {
                let msg = match read_file(&path) {
                    Ok(data) => Message::File {
                        id,
                        data: Bytes(data),
                    },
                    Err(e) => Message::Error {
                        id: Some(id),
                        message: format!("read_file {path}: {e}"),
                    },
                };
                sh.send(gen, &msg, true);
            });
        }
    }
}

fn spawn_or_report(shared: &Arc<Shared>, gen: u64, id: u64, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new()
        .name(format!("agent-req-{id}"))
        .spawn(f)
    {
        let message = format!("cannot start a thread: {e}");
        shared.send(
            gen,
            &Message::Error {
                id: Some(id),
                message,
            },
            false,
        );
    }
}

fn write_file(path: &str, data: &[u8], mode: Option<u32>) -> io::Result<()> {
    let p = std::path::Path::new(path);
    if let Some(parent) = p.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let mut f = std::fs::File::create(p)?;
    f.write_all(data)?;
    if let Some(mode) = mode {
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn read_file(path: &str) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut data = Vec::new();
    f.take(MAX_FILE as u64 + 1).read_to_end(&mut data)?;
    if data.len() > MAX_FILE {
        return Err(io::Error::other(format!(
            "file larger than {MAX_FILE} bytes"
        )));
    }
    Ok(data)
}

fn start_exec(shared: &Arc<Shared>, gen: u64, req: ExecRequest) {
    let id = req.id;
    if req.argv.is_empty() || req.argv[0].is_empty() {
        let message = "exec: argv is empty".to_string();
        shared.send(
            gen,
            &Message::Error {
                id: Some(id),
                message,
            },
            false,
        );
        return;
    }
    let ctl = Arc::new(ExecCtl {
        pgid: AtomicI32::new(0),
        kill: AtomicI32::new(0),
    });
    {
        let mut execs = lock(&shared.execs);
        if execs.contains_key(&id) {
            drop(execs);
            let message = format!("exec: id {id} is already running");
            shared.send(
                gen,
                &Message::Error {
                    id: Some(id),
                    message,
                },
                false,
            );
            return;
        }
        execs.insert(id, ctl.clone());
    }
    let sh = shared.clone();
    let r = thread::Builder::new()
        .name(format!("agent-exec-{id}"))
        .spawn(move || {
            let msg = run_exec(&sh, gen, &req, &ctl);
            lock(&sh.execs).remove(&id);
            sh.send(gen, &msg, true);
        });
    if let Err(e) = r {
        lock(&shared.execs).remove(&id);
        let message = format!("cannot start a thread: {e}");
        shared.send(
            gen,
            &Message::Error {
                id: Some(id),
                message,
            },
            false,
        );
    }
}

/// Runs one exec to completion, streaming its output; returns the final
/// message (`exit` or `error`).
fn run_exec(shared: &Shared, gen: u64, req: &ExecRequest, ctl: &ExecCtl) -> Message {
    let id = req.id;
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .envs(&req.env)
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Message::Error {
                id: Some(id),
                message: format!("cannot execute '{}': {e}", req.argv[0]),
            };
        }
    };
    let pgid = child.id() as i32;
    ctl.pgid.store(pgid, Ordering::SeqCst);
    let pending = ctl.kill.load(Ordering::SeqCst);
    if pending != 0 {
        sys::kill_group(pgid, pending);
    }

    if let (Some(mut stdin), Some(data)) = (child.stdin.take(), req.stdin.clone()) {
        let _ = thread::Builder::new()
            .name(format!("agent-stdin-{id}"))
            .spawn(move || {
                let _ = stdin.write_all(&data.0);
            });
    }

    let mut pipes: Vec<(Stream, OwnedFd)> = Vec::with_capacity(2);
    if let Some(o) = child.stdout.take() {
        pipes.push((Stream::Stdout, o.into()));
    }
    if let Some(e) = child.stderr.take() {
        pipes.push((Stream::Stderr, e.into()));
    }
    for (_, p) in &pipes {
        let _ = sys::set_nonblocking(p);
    }

    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut status = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 32 << 10];
    let mut streaming = true;
    loop {
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    exited_at = Some(Instant::now());
                }
                Ok(None) => {}
                Err(e) => {
                    return Message::Error {
                        id: Some(id),
                        message: format!("waitpid: {e}"),
                    }
                }
            }
        }
        if let (Some(d), None, false) = (deadline, status, timed_out) {
            if Instant::now() >= d {
                timed_out = true;
                ctl.signal(libc::SIGKILL);
            }
        }
        if pipes.is_empty() && status.is_some() {
            break;
        }
        if exited_at.is_some_and(|t| t.elapsed() >= LINGER) {
            // Descendants still hold the pipes: keep them drained (so they
            // do not die of SIGPIPE) on a detached thread, and finish.
            drain_detached(pipes);
            break;
        }
        if pipes.is_empty() {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut pfds: Vec<libc::pollfd> = pipes
            .iter()
            .map(|(_, fd)| sys::pollfd(fd.as_raw_fd(), libc::POLLIN))
            .collect();
        let wait = if status.is_some() {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(50)
        };
        if let Err(e) = sys::poll(&mut pfds, wait) {
            return Message::Error {
                id: Some(id),
                message: format!("poll: {e}"),
            };
        }
        let mut closed = Vec::new();
        for (i, pfd) in pfds.iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let (stream, fd) = &pipes[i];
            // Read what is there now; stop at EAGAIN or EOF.
            loop {
                match sys::read(fd.as_raw_fd(), &mut buf) {
                    Ok(0) => {
                        closed.push(i);
                        break;
                    }
                    Ok(n) => {
                        if streaming {
                            let msg = Message::Output {
                                id,
                                stream: *stream,
                                data: Bytes(buf[..n].to_vec()),
                            };
                            streaming = shared.send(gen, &msg, true);
                        }
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed.push(i);
                        break;
                    }
                }
            }
        }
        for i in closed.into_iter().rev() {
            pipes.remove(i);
        }
    }
    let status = match status {
        Some(s) => s,
        None => match child.wait() {
            Ok(s) => s,
            Err(e) => {
                return Message::Error {
                    id: Some(id),
                    message: format!("waitpid: {e}"),
                }
            }
        },
    };
    let signal = status.signal();
    let code = status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
    Message::Exit {
        id,
        code,
        signal,
        timed_out,
    }
}

fn drain_detached(pipes: Vec<(Stream, OwnedFd)>) {
    if pipes.is_empty() {
        return;
    }
    let _ = thread::Builder::new()
        .name("agent-drain".into())
        .spawn(move || {
            let mut pipes = pipes;
            let mut buf = vec![0u8; 16 << 10];
            while !pipes.is_empty() {
                let mut pfds: Vec<libc::pollfd> = pipes
                    .iter()
                    .map(|(_, fd)| sys::pollfd(fd.as_raw_fd(), libc::POLLIN))
                    .collect();
                if sys::poll(&mut pfds, Duration::from_secs(5)).is_err() {
                    return;
                }
                for i in (0..pfds.len()).rev() {
                    if pfds[i].revents == 0 {
                        continue;
                    }
                    match sys::read(pipes[i].1.as_raw_fd(), &mut buf) {
                        Ok(0) => {
                            pipes.remove(i);
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => {
                            pipes.remove(i);
                        }
                    }
                }
            }
        });
}
