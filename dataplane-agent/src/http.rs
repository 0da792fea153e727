//! The agent's HTTP endpoints, over a deliberately small HTTP/1.1 server (one request per
//! connection, GET only), as kube-proxy lays them out:
//!
//! ```text
//!  metrics address (loopback, :10249)   /healthz (alive), /readyz (first sync programmed), /metrics
//!  healthz address (all, :10256)        /healthz, /livez: kube-proxy's JSON, for load balancers
//!  each healthCheckNodePort (all)       {"service":{..},"localEndpoints":N,..}: 200 if N > 0, else 503
//! ```
use std::sync::Arc;
use std::time::Duration;

use dataplane_core::translate::HealthCheck;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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

async fn handle(mut stream: TcpStream, respond: impl Fn(&str) -> Reply) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 || request.len() > 8192 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (code, kind, body) = match (words.next(), words.next()) {
        (Some("GET"), Some(path)) => respond(path.split('?').next().unwrap_or(path)),
        _ => (405, "text/plain", "only GET\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
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

/// The metrics address, until the task is dropped.
pub async fn serve(listener: TcpListener, status: watch::Receiver<Arc<Status>>) {
    serve_with(listener, status, respond).await;
}
