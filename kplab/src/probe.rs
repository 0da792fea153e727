//! Probes from inside a lab namespace: one TCP connection with one HTTP request, or one UDP
//! datagram, classified as connected (with the backend that answered and the client address it
//! saw), refused (RST / ICMP unreachable) or timeout.
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use super::State;

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Where the probe runs: a pod (namespace/name), a node name, or an external host name.
    #[arg(long)]
    pub from: String,
    /// Target address, ADDR:PORT.
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    pub proto: String,
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Number of probes (each a new connection / a new source port), one JSON line each.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// TCP only: the HTTP path to fetch (its status code is reported as `http_status`).
    #[arg(long, default_value = "/")]
    pub http: String,
}

/// The outcome of one probe; the three results are data, not errors.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub result: String,
    pub backend: Option<String>,
    pub client_seen: Option<String>,
    /// The port and protocol the backend was reached on (`8080/tcp`), as the lab's server saw it:
    /// two backends on one address with different ports are told apart.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub served: Option<String>,
    /// The HTTP status code of a TCP probe's reply.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl ProbeResult {
    fn connected(body: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let served = v
            .get("port")
            .and_then(serde_json::Value::as_u64)
            .zip(field("proto"))
            .map(|(port, proto)| format!("{port}/{proto}"));
        Self {
            result: "connected".to_owned(),
            backend: field("pod"),
            client_seen: field("client"),
            served,
            http_status: None,
            error: None,
        }
    }

    fn other(result: &str, error: Option<String>) -> Self {
        Self {
            result: result.to_owned(),
            backend: None,
            client_seen: None,
            served: None,
            http_status: None,
            error,
        }
    }
}

/// Classifies a socket error, or returns it when the probe itself could not run.
fn classify(e: &std::io::Error) -> Option<ProbeResult> {
    let unreachable = [libc::ENETUNREACH, libc::EHOSTUNREACH];
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => {
            Some(ProbeResult::other("refused", None))
        }
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Some(ProbeResult::other("timeout", None)),
        _ if e.raw_os_error().is_some_and(|c| unreachable.contains(&c)) => {
            Some(ProbeResult::other("refused", Some(e.to_string())))
        }
        _ => None,
    }
}

/// One TCP probe: connect, one HTTP request for `path`, the whole reply.
///
/// # Errors
/// The probe could not run (not a refusal or a timeout).
pub fn tcp(to: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<ProbeResult> {
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e).with_context(|| format!("connecting to {to}: {e}")),
    };
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining))?;
    stream.set_write_timeout(Some(remaining))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    let mut reply = Vec::new();
    let io = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_end(&mut reply));
    if let Err(e) = io {
        return classify(&e).with_context(|| format!("talking to {to}: {e}"));
    }
    let body = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&reply[..0], |i| &reply[i + 4..]);
    let status = std::str::from_utf8(&reply[..reply.len().min(16)])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    Ok(ProbeResult {
        http_status: status,
        ..ProbeResult::connected(body)
    })
}

/// One UDP probe: a datagram from a new source port, and its echo.
///
/// # Errors
/// The probe could not run.
pub fn udp(to: SocketAddr, timeout: Duration) -> anyhow::Result<ProbeResult> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(timeout))?;
    if let Err(e) = socket.send(b"probe") {
        return classify(&e).with_context(|| format!("sending to {to}: {e}"));
    }
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(ProbeResult::connected(&buf[..n])),
        Err(e) => classify(&e).with_context(|| format!("receiving from {to}: {e}")),
    }
}

/// One probe of either protocol (TCP fetches `path`).
///
/// # Errors
/// As [`tcp`] and [`udp`].
pub fn once(
    proto: &str,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<ProbeResult> {
    if proto == "udp" {
        udp(to, timeout)
    } else {
        tcp(to, path, timeout)
    }
}

/// `kplab probe`.
///
/// # Errors
/// No lab, an unknown source, or a probe that could not run.
pub fn main(args: &ProbeArgs) -> anyhow::Result<()> {
    let state = State::load()?;
    state.enter(&args.from)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut out = std::io::stdout().lock();
    for _ in 0..args.count.max(1) {
        let r = once(&args.proto, args.to, &args.http, timeout)?;
        writeln!(out, "{}", serde_json::to_string(&r)?)?;
    }
    Ok(())
}
