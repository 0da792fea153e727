//! `/healthz` (alive), `/readyz` (first full sync programmed), `/metrics` (Prometheus text), over a
//! deliberately small HTTP/1.1 server: one request per connection, GET only.
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::{Status, render};

/// The response to a request path: status code, content type, body.
#[must_use]
pub fn respond(path: &str, status: &Status) -> (u16, &'static str, String) {
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

async fn handle(
    mut stream: TcpStream,
    status: watch::Receiver<Arc<Status>>,
) -> std::io::Result<()> {
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
        (Some("GET"), Some(path)) => {
            respond(path.split('?').next().unwrap_or(path), &status.borrow())
        }
        _ => (405, "text/plain", "only GET\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, status: watch::Receiver<Arc<Status>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, status).await {
                tracing::debug!(error = %e, "http connection");
            }
        });
    }
}
