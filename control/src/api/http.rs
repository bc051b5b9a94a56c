//! The HTTP side: hyper 1 on a tokio listener. Each request's body is read
//! under a size limit, decoded into [`Params`] and handed to [`Api::call`]
//! on a blocking thread (the store and SQLite are synchronous).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::access::{AccessError, SignedRequest};
use super::query::Params;
use super::{xml, Api, ApiError, Reply};
use crate::store::ids;

fn error_reply(e: &ApiError) -> Reply {
    Reply {
        status: e.status(),
        body: xml::error(e.code(), &e.message(), &ids::request_id()),
    }
}

/// Every response's body: whole documents, or a stream (a capture).
pub type ResponseBody = BoxBody<Bytes, Infallible>;

fn to_response(r: Reply) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(Bytes::from(r.body)).boxed());
    *resp.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    resp
}

/// A plain-text or binary response outside the EC2 API.
fn plain(
    status: u16,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `GET /metrics` and `GET /enilab/capture`: the observability routes.
async fn observe(api: Arc<Api>, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    if req.method() != Method::GET {
        return None;
    }
    match req.uri().path() {
        super::metrics::PATH => {
            let text = tokio::task::spawn_blocking(move || {
                super::metrics::render(&super::status::collect(&api))
            })
            .await
            .unwrap_or_default();
            Some(plain(200, super::metrics::CONTENT_TYPE, text))
        }
        super::capture::PATH => {
            let q = req.uri().query().unwrap_or("");
            let text = "text/plain; charset=utf-8";
            let r = match super::capture::CaptureRequest::parse(q) {
                Ok(r) => r,
                Err(e) => return Some(plain(400, text, format!("{e}\n"))),
            };
            match super::capture::start(&api, &r) {
                Ok(body) => {
                    let mut resp = Response::new(body.boxed());
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/vnd.tcpdump.pcap"),
                    );
                    Some(resp)
                }
                Err(e) => Some(plain(404, text, format!("{e}\n"))),
            }
        }
        _ => None,
    }
}

/// The client's address, put in each request's extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

fn access_reply(e: &AccessError) -> Reply {
    Reply {
        status: e.status(),
        body: xml::error(e.code(), &e.to_string(), &ids::request_id()),
    }
}

/// Turn one HTTP request into a reply. Never fails: every problem is an
/// EC2 error document.
pub async fn handle(
    api: Arc<Api>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    if let Some(peer) = peer {
        if let Err(e) = api.config.access.admit(peer.ip()) {
            return Ok(to_response(access_reply(&e)));
        }
    }
    // Unsigned endpoints (status, metrics, capture, live operations) are
    // for local clients once keys are set: SigV4 covers the Query API only.
    let local = peer.is_none_or(|p| p.ip().is_loopback());
    if req.uri().path() != "/" && api.config.access.credentials.is_some() && !local {
        let e = AccessError::Signature(super::access::SigV4Error::Missing);
        return Ok(to_response(access_reply(&e)));
    }
    if let Some(resp) = observe(api.clone(), &req).await {
        return Ok(resp);
    }
    if req.method() == Method::GET && req.uri().path() == super::status::PATH {
        let body = match tokio::task::spawn_blocking(move || super::status::collect(&api)).await {
            Ok(v) => v.to_string(),
            Err(_) => "{}".to_string(),
        };
        return Ok(plain(200, "application/json", body));
    }
    if req.method() == Method::POST && req.uri().path().starts_with("/enilab/") {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let api2 = api.clone();
        let r = tokio::task::spawn_blocking(move || super::failover::live_op(&api2, &path, &query))
            .await
            .unwrap_or(None);
        if let Some((status, v)) = r {
            return Ok(plain(status, "application/json", v.to_string()));
        }
    }
    let mut action = None;
    let reply = handle_inner(api, req, &mut action).await;
    super::metrics::count_request(action.as_deref(), reply.status);
    Ok(to_response(reply))
}

async fn handle_inner(api: Arc<Api>, req: Request<Incoming>, action: &mut Option<String>) -> Reply {
    let max = api.config.max_body;
    if req.method() != Method::POST && req.method() != Method::GET {
        return error_reply(&ApiError::new(
            "UnsupportedHttpVerb",
            format!(
                "The HTTP verb {} is not supported; use POST or GET.",
                req.method()
            ),
        ));
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return error_reply(&ApiError::TooLarge(max));
    }
    let query = req.uri().query().unwrap_or("").as_bytes().to_vec();
    if query.len() > max {
        return error_reply(&ApiError::TooLarge(max));
    }
    // What a signature covers, taken before the body consumes the request.
    let signed = api.config.access.credentials.as_ref().map(|_| {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into(),
                )
            })
            .collect();
        (
            req.method().to_string(),
            req.uri().path().to_string(),
            headers,
        )
    });
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return error_reply(&ApiError::TooLarge(max));
            }
            return error_reply(&ApiError::new(
                "IncompleteBody",
                "The request body could not be read.",
            ));
        }
    };
    if let Some((method, path, headers)) = &signed {
        let req = SignedRequest {
            method,
            path,
            query: std::str::from_utf8(&query).unwrap_or(""),
            headers,
            body: &body,
        };
        if let Err(e) = api.config.access.authenticate(&req) {
            return access_reply(&e);
        }
    }
    let params = match Params::parse(&[&query, &body]) {
        Ok(p) => p,
        Err(e) => return error_reply(&ApiError::Query(e)),
    };
    *action = params.get("Action").map(str::to_string);
    match tokio::task::spawn_blocking(move || api.call(&params)).await {
        Ok(r) => r,
        Err(_) => error_reply(&ApiError::internal(
            "the request handler stopped unexpectedly",
        )),
    }
}

/// Bind `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve connections on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                handle(api.clone(), req)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Failures starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot open the API state")]
    Api(#[source] ApiError),
}

/// Run the daemon until SIGINT or SIGTERM. Prints `listening on http://ADDR`
/// on stdout once the socket is bound (the port is real when ADDR asked
/// for port 0).
pub fn run_daemon(
    listen: SocketAddr,
    state_dir: &std::path::Path,
    config: super::Config,
    driver: Arc<dyn super::InstanceDriver>,
) -> Result<(), HttpError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enilab-api")
        .build()
        .map_err(HttpError::Runtime)?;
    let api = Api::open(state_dir, config, driver).map_err(HttpError::Api)?;
    rt.block_on(async move {
        let listener = bind(listen).await.map_err(|e| HttpError::Bind(listen, e))?;
        let local = listener
            .local_addr()
            .map_err(|e| HttpError::Bind(listen, e))?;
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "listening on http://{local}");
            let _ = out.flush();
        }
        tracing::info!("state in {}", api.store.path().display());
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async {
                    match term.as_mut() {
                        Some(t) => { t.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {},
            }
        };
        serve(listener, api.clone(), shutdown).await;
        // Every change is already committed; give running jobs a moment.
        api.jobs.wait_idle(Duration::from_secs(5));
        Ok(())
    })
}
