//! The metadata HTTP server: hyper 1 (HTTP/1.1 only) on a current-thread
//! tokio runtime of its own thread. Rendering, which takes the store's
//! shared lock, runs on the runtime's blocking pool.
//!
//! What a request gets, in order (as EC2 answers):
//! * an unknown client address: 403;
//! * `/latest/api/token`: PUT only (405); with `X-Forwarded-For`, 403 (a
//!   request that came through a proxy); a TTL header outside 1..=21600,
//!   400; else a token bound to the instance, echoed TTL header;
//! * anything else: GET or HEAD only (405); a token header that is not a
//!   live token of this instance, 401; no token header, IMDSv1 (HttpTokens
//!   optional); then the tree: 200 or 404.
//!
//! Every connection is sent with IP TTL [`Limits::hop_limit`] (EC2's
//! HttpPutResponseHopLimit, default 1): an answer cannot be relayed
//! beyond the guest that asked. Connections are bounded in number, overall
//! and per client, in header size and in time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::render::{lookup, Answer};
use super::token::{parse_ttl, TokenError, Tokens};
use super::{ImdsError, MetadataSource};

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections of one client address (one guest).
    pub max_connections_per_client: usize,
    /// Time to receive a request's headers.
    pub header_timeout: Duration,
    /// Lifetime of a connection, keep-alive included.
    pub connection_timeout: Duration,
    /// Request line and headers, in bytes (hyper answers 431 beyond).
    pub max_header_bytes: usize,
    /// IP TTL of everything the server sends.
    pub hop_limit: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_client: 16,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_header_bytes: 8 * 1024,
            hop_limit: 1,
        }
    }
}

/// Counters of the server since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub connections: u64,
    /// Connections closed at once: over a connection limit.
    pub refused: u64,
    pub requests: u64,
    /// Served without a token (IMDSv1).
    pub v1: u64,
    /// Served with a valid token (IMDSv2).
    pub v2: u64,
    pub tokens: u64,
    /// 401: a token that is not valid.
    pub unauthorized: u64,
    /// 403: an unknown client, or a token request through a proxy.
    pub forbidden: u64,
    /// 400 and 405.
    pub bad_requests: u64,
    pub not_found: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    v1: AtomicU64,
    v2: AtomicU64,
    tokens: AtomicU64,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
    bad_requests: AtomicU64,
    not_found: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn stats(&self) -> Stats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            connections: l(&self.connections),
            refused: l(&self.refused),
            requests: l(&self.requests),
            v1: l(&self.v1),
            v2: l(&self.v2),
            tokens: l(&self.tokens),
            unauthorized: l(&self.unauthorized),
            forbidden: l(&self.forbidden),
            bad_requests: l(&self.bad_requests),
            not_found: l(&self.not_found),
        }
    }
}

/// What the connections share.
struct Shared {
    source: Arc<dyn MetadataSource>,
    limits: Limits,
    tokens: Mutex<Tokens>,
    counters: Counters,
    /// Open connections per client address.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection, counted while it lives.
struct Slot {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl Shared {
    fn take_slot(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        let mine = open.get(&client).copied().unwrap_or(0);
        if total >= self.limits.max_connections || mine >= self.limits.max_connections_per_client {
            return None;
        }
        open.insert(client, mine + 1);
        Some(Slot {
            shared: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// A finished answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    /// The TTL header echoed on a token.
    ttl: Option<u64>,
}

impl Reply {
    fn status(status: StatusCode) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: status
                .canonical_reason()
                .unwrap_or("Error")
                .as_bytes()
                .to_vec(),
            ttl: None,
        }
    }
}

/// The part of a request the answer depends on.
struct Ask {
    method: Method,
    path: String,
    token: Option<Vec<u8>>,
    ttl: Option<Vec<u8>>,
    forwarded: bool,
}

impl Ask {
    fn of(method: &Method, path: &str, headers: &HeaderMap) -> Ask {
        Ask {
            method: method.clone(),
            path: path.to_string(),
            token: headers.get(TOKEN_HEADER).map(|v| v.as_bytes().to_vec()),
            ttl: headers.get(TTL_HEADER).map(|v| v.as_bytes().to_vec()),
            forwarded: headers.contains_key("x-forwarded-for"),
        }
    }
}

fn answer(shared: &Shared, client: IpAddr, ask: &Ask, now: Instant) -> Reply {
    let c = &shared.counters;
    bump(&c.requests);
    let instance = match client {
        IpAddr::V4(a) => shared.source.instance_of(a),
        IpAddr::V6(_) => None,
    };
    let Some(instance) = instance else {
        bump(&c.forbidden);
        return Reply::status(StatusCode::FORBIDDEN);
    };
    let mut tokens = shared.tokens.lock().unwrap_or_else(|e| e.into_inner());
    if ask.path == TOKEN_PATH {
        if ask.method != Method::PUT {
            bump(&c.bad_requests);
            return Reply::status(StatusCode::METHOD_NOT_ALLOWED);
        }
        if ask.forwarded {
            bump(&c.forbidden);
            return Reply::status(StatusCode::FORBIDDEN);
        }
        let ttl = match parse_ttl(ask.ttl.as_deref()) {
            Ok(t) => t,
            Err(_) => {
                bump(&c.bad_requests);
                return Reply::status(StatusCode::BAD_REQUEST);
            }
        };
        return match tokens.issue(&instance, ttl, now) {
            Ok(t) => {
                bump(&c.tokens);
                Reply {
                    status: StatusCode::OK,
                    content_type: "text/plain",
                    body: t.into_bytes(),
                    ttl: Some(ttl.as_secs()),
                }
            }
            Err(TokenError::Random) => Reply::status(StatusCode::INTERNAL_SERVER_ERROR),
            Err(_) => Reply::status(StatusCode::BAD_REQUEST),
        };
    }
    if ask.method != Method::GET && ask.method != Method::HEAD {
        bump(&c.bad_requests);
        return Reply::status(StatusCode::METHOD_NOT_ALLOWED);
    }
    match &ask.token {
        Some(t) => {
            if tokens.check(t, &instance, now).is_err() {
                bump(&c.unauthorized);
                return Reply::status(StatusCode::UNAUTHORIZED);
            }
            bump(&c.v2);
        }
        None => bump(&c.v1),
    }
    drop(tokens);
    let account = shared.source.account_id();
    let mut found = Answer::NotFound;
    shared
        .source
        .with_state(&mut |st| found = lookup(st, &account, &instance, &ask.path));
    if found == Answer::NotFound {
        bump(&c.not_found);
        return Reply::status(StatusCode::NOT_FOUND);
    }
    Reply {
        status: StatusCode::OK,
        content_type: found.content_type(),
        body: found.into_bytes(),
        ttl: None,
    }
}

fn to_response(r: Reply, method: &Method) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    h.insert("server", HeaderValue::from_static("EC2ws"));
    if let Some(ttl) = r.ttl {
        h.insert(TTL_HEADER, HeaderValue::from(ttl));
    }
    if r.status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = if method == Method::GET || method == Method::HEAD {
            "PUT"
        } else {
            "GET, HEAD, PUT"
        };
        h.insert(ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

async fn respond(
    shared: Arc<Shared>,
    client: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let ask = Ask::of(req.method(), req.uri().path(), req.headers());
    let method = ask.method.clone();
    let reply =
        match tokio::task::spawn_blocking(move || answer(&shared, client, &ask, Instant::now()))
            .await
        {
            Ok(r) => r,
            Err(_) => Reply::status(StatusCode::INTERNAL_SERVER_ERROR),
        };
    Ok(to_response(reply, &method))
}

fn serve_connection(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    bump(&shared.counters.connections);
    let Some(slot) = shared.take_slot(peer.ip()) else {
        bump(&shared.counters.refused);
        tracing::debug!(%peer, "metadata connection refused: too many open");
        return;
    };
    if let Err(e) = stream.set_ttl(shared.limits.hop_limit) {
        // Without the hop limit the answer could be relayed: do not serve.
        tracing::warn!(%peer, "cannot set the hop limit: {e}");
        return;
    }
    let _ = stream.set_nodelay(true);
    let limits = shared.limits.clone();
    let client = peer.ip();
    let svc_shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let svc = service_fn(move |req| respond(svc_shared.clone(), client, req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(limits.max_header_bytes)
            .max_headers(32)
            .max_buf_size(limits.max_header_bytes.max(8192) * 2)
            .serve_connection(TokioIo::new(stream), svc);
        match tokio::time::timeout(limits.connection_timeout, conn).await {
            Ok(Err(e)) => tracing::debug!(%peer, "metadata connection ended: {e}"),
            Err(_) => tracing::debug!(%peer, "metadata connection timed out"),
            Ok(Ok(())) => {}
        }
    });
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => serve_connection(&shared, stream, peer),
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!("metadata accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The server on its thread; dropping it stops the thread and closes the
/// listener and every connection.
pub struct Server {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Serve `listener` (bound already, in whatever namespace it was
    /// created in) from a new thread.
    pub fn start(
        listener: std::net::TcpListener,
        source: Arc<dyn MetadataSource>,
        limits: Limits,
    ) -> Result<Server, ImdsError> {
        let local = listener.local_addr().map_err(ImdsError::Socket)?;
        // The SYN-ACK leaves before accept(): limit it on the listener too
        // (accepted sockets inherit the TTL).
        listener
            .set_ttl(limits.hop_limit)
            .map_err(ImdsError::Socket)?;
        listener.set_nonblocking(true).map_err(ImdsError::Socket)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(4)
            .thread_name("enilab-imds-render")
            .build()
            .map_err(ImdsError::Runtime)?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(listener).map_err(ImdsError::Socket)?
        };
        let shared = Arc::new(Shared {
            source,
            limits,
            tokens: Mutex::default(),
            counters: Counters::default(),
            open: Mutex::default(),
        });
        let (tx, rx) = oneshot::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("enilab-imds".into())
            .spawn(move || {
                rt.block_on(accept_loop(listener, sh, rx));
                // Connections still open are dropped with their tasks.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(ImdsError::Spawn)?;
        tracing::info!(%local, "metadata server started");
        Ok(Server {
            shared,
            stop: Some(tx),
            thread: Some(thread),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> Stats {
        self.shared.counters.stats()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(local = %self.local, "metadata server stopped");
    }
}

#[cfg(test)]
mod tests;
