//! The agent's HTTP endpoints, over a deliberately small HTTP/1.1 server (one request per
//! connection, GET only), as kube-proxy lays them out:
//!
//! ```text
//!  metrics address (loopback, :10249)   /healthz (alive), /readyz (first sync programmed), /metrics,
//!                                       /explain?from=..&to=.. (answered by the agent's main loop)
//!  healthz address (all, :10256)        /healthz, /livez: kube-proxy's JSON, for load balancers
//!  each healthCheckNodePort (all)       {"service":{..},"localEndpoints":N,..}: 200 if N > 0, else 503
//! ```
use std::sync::Arc;
use std::time::Duration;

use dataplane_core::translate::HealthCheck;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::{Status, render};

/// Status code, content type, body.
pub type Reply = (u16, &'static str, String);

/// The metrics address: the response to a request path.
#[must_use]
pub fn respond(path: &str, status: &Status) -> Reply {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/readyz" if status.ready() => (200, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            503,
            "text/plain",
            "not ready: first sync not programmed yet\n".to_owned(),
        ),
        "/metrics" => (200, "text/plain; version=0.0.4", render(status)),
        _ => (404, "text/plain", "not found\n".to_owned()),
    }
}

/// The healthz address, kube-proxy's format: healthy (200) once the datapath is programmed;
/// `nodeEligible` is always true (we do not model a node being drained by an autoscaler).
#[must_use]
pub fn respond_node(path: &str, status: &Status) -> Reply {
    if path != "/healthz" && path != "/livez" {
        return (404, "text/plain", "not found\n".to_owned());
    }
    let body = serde_json::json!({
        "lastUpdated": status.last_programmed.clone().unwrap_or_default(),
        "currentTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        "nodeEligible": true,
    });
    let code = if status.ready() { 200 } else { 503 };
    (code, "application/json", format!("{body}\n"))
}

/// A health check node port, kube-proxy's format.
#[must_use]
pub fn respond_health_check(check: &HealthCheck) -> Reply {
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if check.local_endpoints > 0 { 200 } else { 503 };
    (code, "application/json", format!("{body}\n"))
}

/// Reads one request: its target (path and query) for a GET, `None` for another method.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 || request.len() > 8192 {
            return Ok(None);
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    Ok(match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => Some(target.to_owned()),
        _ => None,
    })
}

async fn write_reply(stream: &mut TcpStream, (code, kind, body): Reply) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn handle(mut stream: TcpStream, respond: impl Fn(&str) -> Reply) -> std::io::Result<()> {
    let reply = match read_request(&mut stream).await? {
        Some(target) => respond(target.split('?').next().unwrap_or(&target)),
        None => (405, "text/plain", "only GET\n".to_owned()),
    };
    write_reply(&mut stream, reply).await
}

/// Serves `respond` with the latest value of `state` until the task is dropped.
pub async fn serve_with<T: Send + Sync + 'static>(
    listener: TcpListener,
    state: watch::Receiver<Arc<T>>,
    respond: fn(&str, &T) -> Reply,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let current = state.borrow().clone();
            if let Err(e) = handle(stream, |path| respond(path, &current)).await {
                tracing::debug!(error = %e, "http connection");
            }
        });
    }
}

/// A `/explain` request for the agent's main loop, which owns the programs, and where the
/// answer goes.
pub type ExplainRequest = (
    crate::explain::Query,
    oneshot::Sender<Result<crate::explain::Explanation, String>>,
);

/// The metrics address, until the task is dropped; `/explain?from=..&to=..` is answered by the
/// agent's main loop (JSON; 400 with `{"error"}` when it cannot be answered).
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Arc<Status>>,
    explain: mpsc::Sender<ExplainRequest>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let explain = explain.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_metrics(stream, status, explain).await {
                tracing::debug!(error = %e, "http connection");
            }
        });
    }
}

async fn handle_metrics(
    mut stream: TcpStream,
    status: watch::Receiver<Arc<Status>>,
    explain: mpsc::Sender<ExplainRequest>,
) -> std::io::Result<()> {
    let Some(target) = read_request(&mut stream).await? else {
        return write_reply(&mut stream, (405, "text/plain", "only GET\n".to_owned())).await;
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let reply = if path == "/explain" {
        explain_reply(query, &explain).await
    } else {
        let current = status.borrow().clone();
        respond(path, &current)
    };
    write_reply(&mut stream, reply).await
}

async fn explain_reply(query: &str, explain: &mpsc::Sender<ExplainRequest>) -> Reply {
    let error = |code, e: String| {
        let body = serde_json::json!({ "error": e });
        (code, "application/json", format!("{body}\n"))
    };
    let q = match crate::explain::Query::from_query_string(query) {
        Ok(q) => q,
        Err(e) => return error(400, format!("{e:#}")),
    };
    let (tx, rx) = oneshot::channel();
    if explain.send((q, tx)).await.is_err() {
        return error(503, "the agent is stopping".to_owned());
    }
    match rx.await {
        Ok(Ok(answer)) => (
            200,
            "application/json",
            serde_json::to_string(&answer).unwrap_or_default(),
        ),
        Ok(Err(e)) => error(400, e),
        Err(_) => error(503, "the agent is stopping".to_owned()),
    }
}

/// One GET to `addr` (loopback): the status code and the body.
///
/// # Errors
/// The agent could not be reached or answered something that is not HTTP.
pub fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response"))?;
    Ok((code, body.to_owned()))
}
