//! Host side of the guest agent: the mux over the virtio-serial port.
//!
//! QEMU exposes the guest's `org.enilab.agent` virtio-serial port as a unix
//! socket (`-chardev socket,...,server=on,wait=off`) that accepts exactly one
//! client. [`AgentMux`], owned by the process that launched the instance, is
//! that client: it reads the guest's messages on a thread, remembers the
//! latest `hello` and heartbeat, and serves its own unix socket (by
//! convention `<run dir>/agent.sock`) to any number of local
//! [`AgentClient`]s. It rewrites request ids so that clients cannot collide
//! and routes replies back to whoever asked.
//!
//! The wire protocol (newline-delimited JSON) is [`enilab_agent::proto`];
//! clients speak it to the mux exactly as the mux speaks it to the guest,
//! plus `status`, which the mux answers itself.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use enilab_agent::proto::{self, Bytes, Line, LineBuffer};
pub use enilab_agent::proto::{ExecRequest, Hello, Message, MuxStatus, Request, Stream};

/// How long a host-side wait outlives the guest-side exec timeout before
/// the client gives up (TCG guests can be slow to report).
const EXEC_GRACE: Duration = Duration::from_secs(10);
/// Default timeout of the non-exec requests of an [`AgentClient`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between attempts to connect to QEMU's chardev socket.
const RETRY: Duration = Duration::from_millis(50);

/// Everything that can go wrong talking to a guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent socket {path}; the instance is not running or the path is wrong")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the agent mux socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another agent mux is already serving {0}")]
    InUse(PathBuf),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("the agent connection closed before the reply arrived; the instance stopped or its agent mux exited")]
    Disconnected,
    #[error("the guest agent reported an error: {0}")]
    Guest(String),
    #[error("`{command}` failed with exit code {code}: {stderr}")]
    CommandFailed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("unexpected message from the agent: {0}")]
    Protocol(String),
    #[error("agent connection I/O error: {0}")]
    Io(#[from] io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a guest reply goes.
#[derive(Clone, Copy)]
struct Route {
    client: u64,
    local: u64,
    exec: bool,
}

struct ClientHandle {
    tx: mpsc::Sender<Vec<u8>>,
    stream: UnixStream,
}

#[derive(Default)]
struct MuxState {
    connected: bool,
    hello: Option<Hello>,
    last_heartbeat: Option<Instant>,
    routes: HashMap<u64, Route>,
    clients: HashMap<u64, ClientHandle>,
}

struct MuxShared {
    chardev: PathBuf,
    socket: PathBuf,
    stop: AtomicBool,
    state: Mutex<MuxState>,
    cv: Condvar,
    /// Write half of the guest connection.
    guest: Mutex<Option<UnixStream>>,
    next_id: AtomicU64,
    next_client: AtomicU64,
}

impl MuxShared {
    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn to_client(&self, client: u64, msg: &Message) {
        if let Some(c) = lock(&self.state).clients.get(&client) {
            let _ = c.tx.send(proto::encode_line(msg));
        }
    }

    fn to_guest(&self, req: &Request) -> io::Result<()> {
        let line = proto::encode_line(req);
        let mut g = lock(&self.guest);
        match g.as_mut() {
            Some(s) => s.write_all(&line),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "not connected")),
        }
    }

    fn status(&self, id: u64) -> MuxStatus {
        let st = lock(&self.state);
        MuxStatus {
            id,
            connected: st.connected,
            ready: st.connected && st.hello.is_some(),
            hello: st.hello.clone(),
            last_heartbeat_ms: st.last_heartbeat.map(|t| t.elapsed().as_millis() as u64),
            clients: st.clients.len() as u32,
        }
    }
}

/// The per-instance agent multiplexer. Dropping it stops its threads and
/// removes its socket.
pub struct AgentMux {
    shared: Arc<MuxShared>,
    threads: Vec<JoinHandle<()>>,
    /// A handle on the listening socket, shut down on drop to wake the
    /// accept loop even when the socket file is already gone.
    listener: Option<UnixListener>,
}

impl std::fmt::Debug for AgentMux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMux")
            .field("chardev", &self.shared.chardev)
            .field("socket", &self.shared.socket)
            .field("ready", &self.ready())
            .finish()
    }
}

impl AgentMux {
    /// Serves `mux_socket` at once and connects to QEMU's agent chardev
    /// socket `qemu_chardev` in the background, retrying until it appears
    /// (and again whenever the connection drops).
    pub fn start(
        qemu_chardev: impl AsRef<Path>,
        mux_socket: impl AsRef<Path>,
    ) -> Result<AgentMux, AgentError> {
        let chardev = qemu_chardev.as_ref().to_path_buf();
        let socket = mux_socket.as_ref().to_path_buf();
        let listener = bind_exclusive(&socket)?;
        let wake = listener.try_clone()?;
        // Ids handed to the guest start at a per-mux base (below 2^53, so they
        // survive JSON parsers that use doubles): replies to a previous mux's
        // requests cannot be mistaken for ours.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let base = ((nanos as u64 ^ u64::from(std::process::id())) & 0xfffff) << 32 | 1;
        let shared = Arc::new(MuxShared {
            chardev,
            socket,
            stop: AtomicBool::new(false),
            state: Mutex::new(MuxState::default()),
            cv: Condvar::new(),
            guest: Mutex::new(None),
            next_id: AtomicU64::new(base),
            next_client: AtomicU64::new(1),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            thread::Builder::new()
                .name("agent-mux-guest".into())
                .spawn(move || guest_loop(&s))?,
        );
        let s = shared.clone();
        threads.push(
            thread::Builder::new()
                .name("agent-mux-accept".into())
                .spawn(move || accept_loop(&s, listener))?,
        );
        Ok(AgentMux {
            shared,
            threads,
            listener: Some(wake),
        })
    }

    /// Blocks until the guest agent has said hello on the current
    /// connection, and returns that hello.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Hello, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        loop {
            if st.connected {
                if let Some(h) = &st.hello {
                    return Ok(h.clone());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let what = if st.connected {
                    "the guest agent's hello (QEMU is up; is the guest still booting? see its console log)"
                } else {
                    "QEMU's agent chardev socket to accept a connection"
                };
                return Err(AgentError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// True once the guest agent has said hello on the current connection.
    pub fn ready(&self) -> bool {
        let st = lock(&self.shared.state);
        st.connected && st.hello.is_some()
    }

    /// True while connected to QEMU's chardev socket.
    pub fn connected(&self) -> bool {
        lock(&self.shared.state).connected
    }

    /// The latest hello of the current connection.
    pub fn hello(&self) -> Option<Hello> {
        lock(&self.shared.state).hello.clone()
    }

    /// When the last heartbeat arrived (kept across reconnections, so a
    /// failure detector can compare it with now).
    pub fn last_heartbeat(&self) -> Option<Instant> {
        lock(&self.shared.state).last_heartbeat
    }

    /// What `status` answers to clients.
    pub fn status(&self) -> MuxStatus {
        self.shared.status(0)
    }

    pub fn socket_path(&self) -> &Path {
        &self.shared.socket
    }

    pub fn chardev_path(&self) -> &Path {
        &self.shared.chardev
    }

    /// Stops the mux (same as dropping it).
    pub fn stop(self) {}
}

impl Drop for AgentMux {
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.stop.store(true, Ordering::SeqCst);
        if let Some(g) = lock(&sh.guest).as_ref() {
            let _ = g.shutdown(Shutdown::Both);
        }
        // Wake the blocking accept(): shutdown(2) on a listening socket
        // makes accept fail at once; connecting covers other kernels.
        if let Some(l) = self.listener.take() {
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown on a socket fd we own; no memory is involved.
            unsafe {
                libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        let _ = UnixStream::connect(&sh.socket);
        {
            let mut st = lock(&sh.state);
            for (_, c) in st.clients.drain() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            sh.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&sh.socket);
    }
}

/// Binds `path`, replacing a stale socket but never a live one.
fn bind_exclusive(path: &Path) -> Result<UnixListener, AgentError> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            if UnixStream::connect(path).is_ok() {
                return Err(AgentError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        } else {
            return Err(AgentError::Bind {
                path: path.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ),
            });
        }
    }
    UnixListener::bind(path).map_err(|source| AgentError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

fn guest_loop(sh: &Arc<MuxShared>) {
    let mut announced = false;
    while !sh.stop.load(Ordering::SeqCst) {
        let stream = match UnixStream::connect(&sh.chardev) {
            Ok(s) => s,
            Err(e) => {
                if !announced {
                    tracing::debug!(path = %sh.chardev.display(), error = %e, "waiting for QEMU's agent chardev socket");
                    announced = true;
                }
                thread::sleep(RETRY);
                continue;
            }
        };
        announced = false;
        let Ok(writer) = stream.try_clone() else {
            thread::sleep(RETRY);
            continue;
        };
        *lock(&sh.guest) = Some(writer);
        if sh.stop.load(Ordering::SeqCst) {
            // Drop may have run between connect and storing the writer.
            let _ = stream.shutdown(Shutdown::Both);
        }
        {
            let mut st = lock(&sh.state);
            st.connected = true;
            st.hello = None;
            sh.cv.notify_all();
        }
        tracing::debug!(path = %sh.chardev.display(), "connected to the agent chardev");
        // Ask for a hello now rather than wait for the agent to notice us.
        let _ = sh.to_guest(&Request::Hello { id: sh.fresh_id() });
        read_guest(sh, stream);

        *lock(&sh.guest) = None;
        let orphans: Vec<Route> = {
            let mut st = lock(&sh.state);
            st.connected = false;
            st.hello = None;
            sh.cv.notify_all();
            st.routes.drain().map(|(_, r)| r).collect()
        };
        for r in orphans {
            let message =
                "the connection to the guest agent was lost (QEMU exited or the chardev closed)"
                    .to_string();
            sh.to_client(
                r.client,
                &Message::Error {
                    id: Some(r.local),
                    message,
                },
            );
        }
        if !sh.stop.load(Ordering::SeqCst) {
            tracing::debug!(path = %sh.chardev.display(), "agent chardev connection closed; reconnecting");
            thread::sleep(RETRY);
        }
    }
}

fn read_guest(sh: &MuxShared, mut stream: UnixStream) {
    let mut lines = LineBuffer::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for line in lines.push(&buf[..n]) {
            let Line::Complete(line) = line else {
                tracing::warn!("overlong line from the guest agent dropped");
                continue;
            };
            match proto::decode_line::<Message>(&line) {
                Ok(msg) => from_guest(sh, msg),
                Err(e) => tracing::warn!(error = %e, "unparsable line from the guest agent"),
            }
        }
    }
}

fn from_guest(sh: &MuxShared, mut msg: Message) {
    let mut st = lock(&sh.state);
    match &msg {
        Message::Heartbeat { .. } => {
            st.last_heartbeat = Some(Instant::now());
            return;
        }
        Message::Hello(h) => {
            let mut cached = h.clone();
            cached.id = None;
            if st.hello.is_none() {
                tracing::info!(hostname = %cached.hostname, boot_ms = cached.boot_ms, "guest agent ready");
            }
            st.hello = Some(cached);
            sh.cv.notify_all();
        }
        Message::Error { id: None, message } => {
            tracing::warn!(%message, "guest agent error");
            return;
        }
        _ => {}
    }
    let Some(id) = msg.id() else { return };
    let route = if msg.is_final() {
        st.routes.remove(&id)
    } else {
        st.routes.get(&id).copied()
    };
    let Some(route) = route else { return }; // our own hello request, or a cancelled exec
    msg.set_id(route.local);
    if let Some(c) = st.clients.get(&route.client) {
        let _ = c.tx.send(proto::encode_line(&msg));
    }
}

fn accept_loop(sh: &Arc<MuxShared>, listener: UnixListener) {
    for conn in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "agent mux accept failed");
                thread::sleep(RETRY);
                continue;
            }
        };
        let (Ok(w), Ok(keep)) = (stream.try_clone(), stream.try_clone()) else {
            continue;
        };
        let cid = sh.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        lock(&sh.state)
            .clients
            .insert(cid, ClientHandle { tx, stream: keep });
        let _ = thread::Builder::new()
            .name(format!("agent-mux-w{cid}"))
            .spawn(move || {
                let mut w = w;
                for line in rx {
                    if w.write_all(&line).is_err() {
                        let _ = w.shutdown(Shutdown::Both);
                        return;
                    }
                }
            });
        let s = sh.clone();
        let _ = thread::Builder::new()
            .name(format!("agent-mux-r{cid}"))
            .spawn(move || client_loop(&s, cid, stream));
    }
}

fn client_loop(sh: &MuxShared, cid: u64, mut stream: UnixStream) {
    let mut lines = LineBuffer::new();
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for line in lines.push(&buf[..n]) {
            if sh.stop.load(Ordering::SeqCst) {
                break 'outer;
            }
            from_client(sh, cid, line);
        }
    }
    // The client left: forget its routes and cancel its running execs.
    let execs: Vec<u64> = {
        let mut st = lock(&sh.state);
        st.clients.remove(&cid);
        let mine: Vec<u64> = st
            .routes
            .iter()
            .filter(|(_, r)| r.client == cid)
            .map(|(g, _)| *g)
            .collect();
        mine.into_iter()
            .filter_map(|g| st.routes.remove(&g).and_then(|r| r.exec.then_some(g)))
            .collect()
    };
    for target in execs {
        let _ = sh.to_guest(&Request::Cancel {
            id: sh.fresh_id(),
            target,
            signal: None,
        });
    }
}

fn from_client(sh: &MuxShared, cid: u64, line: Line) {
    let line = match line {
        Line::Complete(l) => l,
        Line::TooLong => {
            let message = format!(
                "request line longer than {} bytes, ignored",
                proto::MAX_LINE
            );
            sh.to_client(cid, &Message::Error { id: None, message });
            return;
        }
    };
    let mut req: Request = match proto::decode_line(&line) {
        Ok(r) => r,
        Err(e) => {
            sh.to_client(
                cid,
                &Message::Error {
                    id: e.id,
                    message: e.message,
                },
            );
            return;
        }
    };
    let local = req.id();
    if let Request::Status { id } = req {
        sh.to_client(cid, &Message::Status(sh.status(id)));
        return;
    }
    let global = sh.fresh_id();
    {
        let mut st = lock(&sh.state);
        if let Request::Cancel { target, .. } = &mut req {
            let found = st
                .routes
                .iter()
                .find(|(_, r)| r.client == cid && r.local == *target && r.exec)
                .map(|(g, _)| *g);
            match found {
                Some(g) => *target = g,
                None => {
                    drop(st);
                    let message = format!("no running exec with id {target}");
                    sh.to_client(
                        cid,
                        &Message::Error {
                            id: Some(local),
                            message,
                        },
                    );
                    return;
                }
            }
        }
        let exec = matches!(req, Request::Exec(_));
        st.routes.insert(
            global,
            Route {
                client: cid,
                local,
                exec,
            },
        );
    }
    req.set_id(global);
    if let Err(e) = sh.to_guest(&req) {
        lock(&sh.state).routes.remove(&global);
        let message = if e.kind() == io::ErrorKind::NotConnected {
            "the guest agent is not connected (the instance is not running, or QEMU has not opened its chardev yet)".to_string()
        } else {
            format!("cannot write to the guest agent: {e}")
        };
        sh.to_client(
            cid,
            &Message::Error {
                id: Some(local),
                message,
            },
        );
    }
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecStatus {
    /// Exit code, or 128+signal when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
    /// Killed because its `timeout` passed.
    pub timed_out: bool,
}

impl ExecStatus {
    pub fn success(&self) -> bool {
        self.code == 0 && self.signal.is_none()
    }
}

/// The captured result of [`AgentClient::exec_capture`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0 && self.signal.is_none()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A connection to an instance's agent mux socket. Requests on one client
/// run one at a time; open more clients (cheap) for concurrent execs.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    lines: LineBuffer,
    pending: VecDeque<Message>,
    next_id: u64,
    timeout: Duration,
}

impl AgentClient {
    /// Connects to a mux socket (`<run dir>/agent.sock`).
    pub fn connect(mux_socket: impl AsRef<Path>) -> Result<AgentClient, AgentError> {
        let path = mux_socket.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| AgentError::NotRunning {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(AgentClient {
            stream,
            lines: LineBuffer::new(),
            pending: VecDeque::new(),
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Timeout of `ping`, `read_file`, `write_file`, `hello`, `status`
    /// (default 30 s). Execs use their own timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn send(&mut self, req: &Request) -> Result<(), AgentError> {
        self.stream
            .write_all(&proto::encode_line(req))
            .map_err(|e| match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    AgentError::Disconnected
                }
                _ => AgentError::Io(e),
            })
    }

    /// Next message for `id`, waiting until `deadline` (None: forever).
    fn recv(
        &mut self,
        id: u64,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<Message, AgentError> {
        let mut buf = [0u8; 64 << 10];
        loop {
            if let Some(pos) = self.pending.iter().position(|m| m.id() == Some(id)) {
                return Ok(self.pending.remove(pos).expect("position is in range"));
            }
            // Replies to requests we gave up on are dropped here.
            self.pending.clear();
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(AgentError::Timeout {
                            what: what.to_string(),
                            after: Duration::ZERO,
                        });
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream.set_read_timeout(wait)?;
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(AgentError::Disconnected),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(AgentError::Disconnected)
                }
                Err(e) => return Err(e.into()),
            };
            for line in self.lines.push(&buf[..n]) {
                let Line::Complete(line) = line else {
                    return Err(AgentError::Protocol("overlong line".into()));
                };
                let msg: Message =
                    proto::decode_line(&line).map_err(|e| AgentError::Protocol(e.message))?;
                if let Message::Error { id: None, message } = &msg {
                    return Err(AgentError::Guest(message.clone()));
                }
                self.pending.push_back(msg);
            }
        }
    }

    fn request(&mut self, mut req: Request, what: &str) -> Result<Message, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        req.set_id(id);
        self.send(&req)?;
        let deadline = Instant::now() + self.timeout;
        match self.recv(id, Some(deadline), what) {
            Err(AgentError::Timeout { what, .. }) => Err(AgentError::Timeout {
                what,
                after: self.timeout,
            }),
            Ok(Message::Error { message, .. }) => Err(AgentError::Guest(message)),
            other => other,
        }
    }

    /// Runs `argv` in the guest, calling `on_output` with each chunk of
    /// output as it arrives. With a `timeout` the guest kills the process
    /// group when it passes (the result then has `timed_out`); the host
    /// gives up 10 s later.
    pub fn exec<S: AsRef<str>>(
        &mut self,
        argv: &[S],
        stdin: Option<&[u8]>,
        timeout: impl Into<Option<Duration>>,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecStatus, AgentError> {
        let timeout = timeout.into();
        let req = ExecRequest {
            id: 0,
            argv: argv.iter().map(|s| s.as_ref().to_string()).collect(),
            stdin: stdin.map(Bytes::from),
            timeout_ms: timeout.map(|t| t.as_millis().max(1) as u64),
            ..Default::default()
        };
        self.exec_request(req, on_output)
    }

    /// [`exec`](Self::exec) with every option (env, cwd) available. The
    /// request's `id` is replaced.
    pub fn exec_request(
        &mut self,
        mut req: ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExecStatus, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        req.id = id;
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let deadline = timeout.map(|t| Instant::now() + t + EXEC_GRACE);
        let what = format!("`{}` to finish", req.argv.join(" "));
        self.send(&Request::Exec(req))?;
        loop {
            match self.recv(id, deadline, &what) {
                Ok(Message::Output { stream, data, .. }) => on_output(stream, &data.0),
                Ok(Message::Exit {
                    code,
                    signal,
                    timed_out,
                    ..
                }) => {
                    return Ok(ExecStatus {
                        code,
                        signal,
                        timed_out,
                    })
                }
                Ok(Message::Error { message, .. }) => return Err(AgentError::Guest(message)),
                Ok(other) => {
                    return Err(AgentError::Protocol(format!(
                        "unexpected reply to exec: {other:?}"
                    )))
                }
                Err(AgentError::Timeout { what, .. }) => {
                    let cancel = Request::Cancel {
                        id: self.next_id,
                        target: id,
                        signal: None,
                    };
                    self.next_id += 1;
                    let _ = self.send(&cancel);
                    return Err(AgentError::Timeout {
                        what,
                        after: timeout.unwrap_or_default() + EXEC_GRACE,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `argv` and collects its output.
    pub fn exec_capture<S: AsRef<str>>(
        &mut self,
        argv: &[S],
        timeout: impl Into<Option<Duration>>,
    ) -> Result<Output, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let st = self.exec(argv, None, timeout, |s, d| match s {
            Stream::Stdout => stdout.extend_from_slice(d),
            Stream::Stderr => stderr.extend_from_slice(d),
        })?;
        Ok(Output {
            code: st.code,
            signal: st.signal,
            timed_out: st.timed_out,
            stdout,
            stderr,
        })
    }

    /// Runs `argv` and returns its stdout, or [`AgentError::CommandFailed`]
    /// if it did not exit 0.
    pub fn exec_ok<S: AsRef<str>>(
        &mut self,
        argv: &[S],
        timeout: impl Into<Option<Duration>>,
    ) -> Result<String, AgentError> {
        let out = self.exec_capture(argv, timeout)?;
        if !out.success() {
            let command = argv
                .iter()
                .map(|s| s.as_ref())
                .collect::<Vec<_>>()
                .join(" ");
            return Err(AgentError::CommandFailed {
                command,
                code: out.code,
                stderr: out.stderr_str().trim().to_string(),
            });
        }
        Ok(out.stdout_str())
    }

    /// Round trip to the guest agent; returns the round-trip time.
    pub fn ping(&mut self) -> Result<Duration, AgentError> {
        let t0 = Instant::now();
        match self.request(Request::Ping { id: 0 }, "pong")? {
            Message::Pong { .. } => Ok(t0.elapsed()),
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to ping: {other:?}"
            ))),
        }
    }

    /// Asks the guest agent to reconcile its ENIs with instance metadata
    /// now (and often for a few seconds).
    pub fn reconcile(&mut self) -> Result<(), AgentError> {
        match self.request(Request::Reconcile { id: 0 }, "reconcile")? {
            Message::Ok { .. } => Ok(()),
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to reconcile: {other:?}"
            ))),
        }
    }

    /// Creates or replaces `path` in the guest (parent directories too).
    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        let req = Request::WriteFile {
            id: 0,
            path: path.to_string(),
            data: Bytes::from(data),
            mode,
        };
        match self.request(req, "write_file")? {
            Message::Ok { .. } => Ok(()),
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to write_file: {other:?}"
            ))),
        }
    }

    /// Reads a whole file from the guest (at most 32 MiB).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, AgentError> {
        match self.request(
            Request::ReadFile {
                id: 0,
                path: path.to_string(),
            },
            "read_file",
        )? {
            Message::File { data, .. } => Ok(data.0),
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to read_file: {other:?}"
            ))),
        }
    }

    /// A fresh hello from the guest agent.
    pub fn hello(&mut self) -> Result<Hello, AgentError> {
        match self.request(Request::Hello { id: 0 }, "hello")? {
            Message::Hello(mut h) => {
                h.id = None;
                Ok(h)
            }
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to hello: {other:?}"
            ))),
        }
    }

    /// The mux's view: connected, ready, last hello, heartbeat age.
    pub fn status(&mut self) -> Result<MuxStatus, AgentError> {
        match self.request(Request::Status { id: 0 }, "status")? {
            Message::Status(s) => Ok(s),
            other => Err(AgentError::Protocol(format!(
                "unexpected reply to status: {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::AtomicUsize;

    static SEQ: AtomicUsize = AtomicUsize::new(0);

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "enilab-agent-mux-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn test_hello(name: &str) -> Hello {
        Hello {
            version: "test".into(),
            protocol: proto::PROTOCOL_VERSION,
            hostname: name.into(),
            boot_ms: 7,
            ..Default::default()
        }
    }

    /// A fake QEMU chardev socket whose single client is served by the real
    /// agent loop (execs run on this host).
    fn real_guest(chardev: &Path) -> JoinHandle<()> {
        let listener = UnixListener::bind(chardev).unwrap();
        thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let opts = enilab_agent::ServeOptions {
                reconnectable: false,
                heartbeat: Duration::from_millis(100),
                hello: Arc::new(|| test_hello("fake-guest")),
                stop: Arc::new(AtomicBool::new(false)),
            };
            let _ = enilab_agent::serve(conn.into(), opts);
        })
    }

    /// A hand-driven guest end: sees exactly what the mux sends.
    struct FakeGuest {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl FakeGuest {
        fn accept(l: &UnixListener) -> FakeGuest {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut g = FakeGuest {
                r: BufReader::new(s.try_clone().unwrap()),
                w: s,
            };
            g.send(&Message::Hello(test_hello("hand")));
            g
        }

        fn send(&mut self, m: &Message) {
            self.w.write_all(&proto::encode_line(m)).unwrap();
        }

        /// Next request other than the mux's own hello requests.
        fn recv(&mut self) -> Request {
            loop {
                let mut line = String::new();
                assert!(
                    self.r.read_line(&mut line).unwrap() > 0,
                    "mux closed the guest connection"
                );
                match proto::decode_line::<Request>(line.as_bytes()).unwrap() {
                    Request::Hello { .. } => continue,
                    r => return r,
                }
            }
        }
    }

    #[test]
    fn mux_and_client_against_the_real_agent_loop() {
        let dir = tmpdir();
        let chardev = dir.join("agent-serial.sock");
        let guest = real_guest(&chardev);
        let mux = AgentMux::start(&chardev, dir.join("agent.sock")).unwrap();
        let hello = mux.wait_ready(Duration::from_secs(10)).unwrap();
        assert_eq!(hello.hostname, "fake-guest");
        assert!(mux.ready());

        let mut c = AgentClient::connect(mux.socket_path()).unwrap();
        let out = c
            .exec_capture(
                &["sh", "-c", "echo hi; echo err >&2; exit 2"],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(
            (
                out.code,
                out.stdout_str().as_str(),
                out.stderr_str().as_str()
            ),
            (2, "hi\n", "err\n")
        );
        assert!(!out.success());
        assert_eq!(c.exec_ok(&["echo", "ok"], None).unwrap(), "ok\n");
        match c.exec_ok(&["sh", "-c", "echo bad >&2; exit 1"], None) {
            Err(AgentError::CommandFailed {
                code: 1, stderr, ..
            }) => assert_eq!(stderr, "bad"),
            other => panic!("{other:?}"),
        }

        // Streaming: the first chunk arrives long before the exit.
        let t0 = Instant::now();
        let mut first = None;
        let st = c
            .exec(
                &["sh", "-c", "echo a; sleep 1; echo b"],
                None,
                Duration::from_secs(10),
                |_, _| {
                    first.get_or_insert(t0.elapsed());
                },
            )
            .unwrap();
        assert!(st.success());
        assert!(
            first.unwrap() < Duration::from_millis(800),
            "first output after {first:?}"
        );

        let st = c
            .exec(
                &["sleep", "10"],
                None,
                Duration::from_millis(200),
                |_, _| {},
            )
            .unwrap();
        assert!(st.timed_out && st.signal == Some(9), "{st:?}");
        let st = c.exec(&["cat"], Some(b"in put"), None, |s, d| {
            assert_eq!((s, d), (Stream::Stdout, &b"in put"[..]));
        });
        assert!(st.unwrap().success());

        c.ping().unwrap();
        let f = dir.join("f.txt").to_string_lossy().into_owned();
        c.write_file(&f, b"data\x00\xff", Some(0o600)).unwrap();
        assert_eq!(c.read_file(&f).unwrap(), b"data\x00\xff");
        match c.read_file("/nonexistent/file") {
            Err(AgentError::Guest(m)) => assert!(m.contains("nonexistent"), "{m}"),
            other => panic!("{other:?}"),
        }
        match c.exec_capture(&["/nonexistent/binary"], None) {
            Err(AgentError::Guest(m)) => assert!(m.contains("cannot execute"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.hello().unwrap().hostname, "fake-guest");
        let status = c.status().unwrap();
        assert!(
            status.connected && status.ready && status.clients == 1,
            "{status:?}"
        );

        thread::sleep(Duration::from_millis(300));
        assert!(mux.last_heartbeat().unwrap().elapsed() < Duration::from_millis(300));

        // Clients with colliding ids, concurrently.
        let sock = mux.socket_path().to_path_buf();
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let sock = sock.clone();
                thread::spawn(move || {
                    let mut c = AgentClient::connect(&sock).unwrap();
                    for j in 0..5 {
                        let marker = format!("client{i}-run{j}");
                        let out = c
                            .exec_ok(&["sh", "-c", &format!("sleep 0.0{j}; echo {marker}")], None)
                            .unwrap();
                        assert_eq!(out.trim(), marker);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }

        let sock = mux.socket_path().to_path_buf();
        drop(c);
        drop(mux);
        assert!(!sock.exists(), "mux socket left behind");
        guest.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mux_waits_for_qemu_and_rewrites_ids() {
        let dir = tmpdir();
        let chardev = dir.join("agent-serial.sock");
        let mux = AgentMux::start(&chardev, dir.join("agent.sock")).unwrap();
        assert!(!mux.connected());
        match mux.wait_ready(Duration::from_millis(200)) {
            Err(AgentError::Timeout { what, .. }) => assert!(what.contains("chardev"), "{what}"),
            other => panic!("{other:?}"),
        }
        // Not connected yet: requests fail at once with a clear error.
        let mut early = AgentClient::connect(mux.socket_path()).unwrap();
        match early.ping() {
            Err(AgentError::Guest(m)) => assert!(m.contains("not connected"), "{m}"),
            other => panic!("{other:?}"),
        }

        thread::sleep(Duration::from_millis(200));
        let listener = UnixListener::bind(&chardev).unwrap(); // "QEMU" starts late
        let mut g = FakeGuest::accept(&listener);
        assert_eq!(
            mux.wait_ready(Duration::from_secs(5)).unwrap().hostname,
            "hand"
        );

        let mut a = AgentClient::connect(mux.socket_path()).unwrap();
        let mut b = AgentClient::connect(mux.socket_path()).unwrap();
        let ta = thread::spawn(move || a.ping().map(|_| a));
        let tb = thread::spawn(move || b.ping().map(|_| b));
        let (r1, r2) = (g.recv(), g.recv());
        let (id1, id2) = (r1.id(), r2.id());
        assert!(matches!(r1, Request::Ping { .. }) && matches!(r2, Request::Ping { .. }));
        assert_ne!(
            id1, id2,
            "both clients used id 1; the mux must rewrite them"
        );
        assert!(id1 > 1 && id2 > 1);
        g.send(&Message::Pong {
            id: id2,
            uptime_ms: 1,
        });
        g.send(&Message::Pong {
            id: id1,
            uptime_ms: 1,
        });
        g.send(&Message::Pong {
            id: 12345,
            uptime_ms: 1,
        }); // unknown: dropped
        g.send(&Message::Heartbeat {
            seq: 1,
            uptime_ms: 2,
        });
        let mut a = ta.join().unwrap().unwrap();
        let _b = tb.join().unwrap().unwrap();
        for _ in 0..50 {
            if mux.last_heartbeat().is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(mux.last_heartbeat().is_some());

        // A client that disappears mid-exec gets its exec cancelled.
        let mut raw = UnixStream::connect(mux.socket_path()).unwrap();
        raw.write_all(b"{\"type\":\"exec\",\"id\":1,\"argv\":[\"sleep\",\"100\"]}\n")
            .unwrap();
        let exec_id = match g.recv() {
            Request::Exec(e) => e.id,
            r => panic!("{r:?}"),
        };
        // Malformed client input is answered, not fatal.
        raw.write_all(b"nonsense\n").unwrap();
        let mut line = String::new();
        BufReader::new(raw.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("\"error\""), "{line}");
        drop(raw);
        match g.recv() {
            Request::Cancel { target, .. } => assert_eq!(target, exec_id),
            r => panic!("{r:?}"),
        }

        // The guest connection drops: in-flight requests fail promptly,
        // and the mux reconnects when "QEMU" accepts again.
        let t = thread::spawn(move || {
            let r = a.read_file("/x");
            (a, r)
        });
        assert!(matches!(g.recv(), Request::ReadFile { .. }));
        drop(g);
        let (_a, r) = t.join().unwrap();
        match r {
            Err(AgentError::Guest(m)) => assert!(m.contains("lost"), "{m}"),
            other => panic!("{other:?}"),
        }
        let _g2 = FakeGuest::accept(&listener);
        assert!(mux.wait_ready(Duration::from_secs(5)).is_ok());
        drop(mux);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_are_clear() {
        let dir = tmpdir();
        let missing = dir.join("nope.sock");
        let e = AgentClient::connect(&missing).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("not running") && text.contains("nope.sock"),
            "{text}"
        );

        let sock = dir.join("agent.sock");
        let mux = AgentMux::start(dir.join("chardev.sock"), &sock).unwrap();
        assert!(matches!(
            AgentMux::start(dir.join("chardev.sock"), &sock),
            Err(AgentError::InUse(_))
        ));
        drop(mux);
        // A stale socket file is replaced.
        let stale = UnixListener::bind(&sock).unwrap();
        drop(stale);
        let mux = AgentMux::start(dir.join("chardev.sock"), &sock).unwrap();
        drop(mux);
        std::fs::write(&sock, b"not a socket").unwrap();
        assert!(matches!(
            AgentMux::start(dir.join("chardev.sock"), &sock),
            Err(AgentError::Bind { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Kills the QEMU child (and only it) when the test ends.
    struct Qemu(std::process::Child);

    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Boots the real image under TCG and drives the agent through the mux.
    /// Needs images/out (images/build.sh) and QEMU 10:
    /// `cargo test -p enilab-control --lib agent::tests::boots -- --ignored --nocapture`.
    /// ENILAB_TEST_NIC=0 boots without the user-mode (slirp) NIC;
    /// ENILAB_TEST_APPEND adds kernel parameters (e.g. `quiet`).
    #[test]
    #[ignore = "boots a VM under TCG (~10 s); needs images/out and qemu-system-x86_64"]
    fn boots_the_image_and_the_agent_answers() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out");
        let (kernel, initrd) = (images.join("vmlinuz"), images.join("initramfs.img"));
        assert!(
            kernel.exists() && initrd.exists(),
            "run images/build.sh first"
        );
        let nic = std::env::var("ENILAB_TEST_NIC")
            .map(|v| v != "0")
            .unwrap_or(true);
        let dir = tmpdir();
        let chardev = dir.join("agent-serial.sock");
        let mut cmd = std::process::Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-m",
            "512",
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 enilab.instance=i-0test {}",
            std::env::var("ENILAB_TEST_APPEND").unwrap_or_default()
        ))
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agentchr,path={},server=on,wait=off",
            chardev.display()
        ))
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=agentchr,name=org.enilab.agent",
        ])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .args(["-monitor", "none"]);
        if nic {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            ]);
        }
        let t0 = Instant::now();
        let _qemu = Qemu(cmd.spawn().expect("qemu-system-x86_64"));
        let mux = AgentMux::start(&chardev, dir.join("agent.sock")).unwrap();
        let hello = mux.wait_ready(Duration::from_secs(120)).unwrap();
        let boot = t0.elapsed();
        println!(
            "hello after {boot:?} (guest uptime at agent start {} ms): {hello:?}",
            hello.boot_ms
        );
        assert_eq!(hello.instance.as_deref(), Some("i-0test"));
        assert_eq!(hello.hostname, "i-0test");

        let mut c = AgentClient::connect(mux.socket_path()).unwrap();
        println!("ping rtt {:?}", c.ping().unwrap());
        let t = Duration::from_secs(60);
        let run = |c: &mut AgentClient, argv: &[&str]| {
            let out = c.exec_capture(argv, t).unwrap();
            println!(
                "$ {}  [exit {}]\n{}{}",
                argv.join(" "),
                out.code,
                out.stdout_str(),
                out.stderr_str()
            );
            assert!(out.success(), "{argv:?} failed");
            out.stdout_str()
        };
        assert_eq!(run(&mut c, &["uname", "-r"]).trim(), hello.kernel);
        run(&mut c, &["ip", "-br", "link"]);
        // /bin/sh must not shadow iproute2's ip with busybox's applet.
        assert!(run(&mut c, &["sh", "-c", "ip -V"]).contains("iproute2"));
        assert!(run(&mut c, &["iperf3", "--version"]).contains("iperf 3"));
        assert!(run(&mut c, &["ethtool", "--version"]).contains("ethtool version"));
        assert!(run(&mut c, &["cat", "/proc/cmdline"]).contains("enilab.instance=i-0test"));
        let lsmod = run(&mut c, &["lsmod"]);
        for m in ["virtio_net", "virtio_console", "virtio_pci", "net_failover"] {
            assert!(lsmod.contains(m), "{m} not loaded");
        }
        let drivers = run(&mut c, &["ls", "/sys/bus/virtio/drivers"]);
        assert!(
            drivers.contains("virtio_net") && drivers.contains("virtio_console"),
            "{drivers}"
        );
        run(
            &mut c,
            &[
                "sh",
                "-c",
                "iperf3 -s -D -1 && sleep 0.5 && iperf3 -c 127.0.0.1 -t 1 -f m | tail -4",
            ],
        );
        if nic {
            // udhcpc against slirp's DHCP server: address, MTU, default route.
            let mut lease = String::new();
            for _ in 0..60 {
                if let Ok(l) = c.read_file("/run/enilab/net/eth0.lease") {
                    lease = String::from_utf8_lossy(&l).into_owned();
                    break;
                }
                thread::sleep(Duration::from_millis(500));
            }
            println!("eth0.lease:\n{lease}");
            assert!(lease.contains("ip=10.0.2.15"), "no DHCP lease on eth0");
            run(&mut c, &["ip", "-4", "addr", "show", "dev", "eth0"]);
            assert!(run(&mut c, &["ip", "route"]).contains("default via 10.0.2.2 dev eth0"));
        }
        // Bulk transfer over the virtio-serial link, both ways.
        let t1 = Instant::now();
        let mut got = 0usize;
        let st = c.exec(
            &["dd", "if=/dev/zero", "bs=65536", "count=160"],
            None,
            t,
            |s, d| {
                if s == Stream::Stdout {
                    got += d.len();
                }
            },
        );
        assert!(st.unwrap().success());
        assert_eq!(got, 10 << 20);
        println!("10 MiB of exec output in {:?}", t1.elapsed());
        let blob: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let t1 = Instant::now();
        c.write_file("/tmp/blob", &blob, None).unwrap();
        let back = c.read_file("/tmp/blob").unwrap();
        assert!(back == blob, "file came back altered");
        println!("4 MiB write_file + read_file in {:?}", t1.elapsed());

        let st = c.status().unwrap();
        assert!(st.last_heartbeat_ms.is_some_and(|ms| ms < 3000), "{st:?}");

        // A long exec is killed when the host side goes away, and a new mux
        // (a restarted control plane) gets a fresh hello and a working agent.
        let mut bg = AgentClient::connect(mux.socket_path()).unwrap();
        let t_bg = thread::spawn(move || {
            bg.exec(
                &["sh", "-c", "sleep 30; touch /tmp/survived"],
                None,
                None,
                |_, _| {},
            )
        });
        thread::sleep(Duration::from_millis(500));
        drop(c);
        drop(mux);
        assert!(t_bg.join().unwrap().is_err());
        thread::sleep(Duration::from_secs(2));
        let t1 = Instant::now();
        let mux = AgentMux::start(&chardev, dir.join("agent.sock")).unwrap();
        let again = mux.wait_ready(Duration::from_secs(30)).unwrap();
        println!("re-hello after {:?}", t1.elapsed());
        assert_eq!(
            again.pid, hello.pid,
            "the agent restarted instead of reconnecting"
        );
        let mut c = AgentClient::connect(mux.socket_path()).unwrap();
        let ps = run(&mut c, &["sh", "-c", "ps; ls /tmp"]);
        assert!(
            !ps.contains("sleep 30") && !ps.contains("survived"),
            "exec outlived its session:\n{ps}"
        );
        drop(c);
        drop(mux);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
