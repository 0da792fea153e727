//! The server every lab pod runs: on each TCP containerPort enough HTTP/1.1 for curl, on each UDP
//! containerPort an echo; both answer with the pod's namespace/name and the client address seen.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The pod, as namespace/name.
    #[arg(long)]
    pod: String,
    #[arg(long)]
    tcp: Vec<u16>,
    #[arg(long)]
    udp: Vec<u16>,
}

/// The reply body: which pod answered, and whom it saw.
pub fn answer(pod: &str, client: SocketAddr, port: u16, proto: &str) -> String {
    serde_json::json!({ "pod": pod, "client": client.to_string(), "port": port, "proto": proto })
        .to_string()
}

/// Answers requests on one connection: HTTP/1.1 keep-alive until the client asks to close, goes
/// away, or stays silent for 30 s (so tests can hold a connection open across changes).
fn handle_http(mut stream: TcpStream, pod: &str, port: u16) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            if pending.len() > 8192 {
                break None;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break None,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let Some(end) = end else {
            return;
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
        pending.drain(..end);
        let close = head.contains("connection: close");
        let body = answer(pod, peer, port, "tcp") + "\n";
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if stream.write_all(reply.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Serves until killed.
///
/// # Errors
/// A port could not be bound.
pub fn main(args: &ServeArgs) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for &port in &args.tcp {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("binding TCP port {port}"))?;
        let pod = args.pod.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let pod = pod.clone();
                std::thread::spawn(move || handle_http(stream, &pod, port));
            }
        }));
    }
    for &port in &args.udp {
        let socket = UdpSocket::bind(("0.0.0.0", port))
            .with_context(|| format!("binding UDP port {port}"))?;
        let pod = args.pod.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(answer(&pod, peer, port, "udp").as_bytes(), peer);
            }
        }));
    }
    eprintln!(
        "serving {} on tcp {:?} udp {:?}",
        args.pod, args.tcp, args.udp
    );
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Starts a real server in a pod's namespace: nginx answering every request on the pod's first
/// TCP port with its name (no access log, one worker), an iperf3 server on it, or dnsmasq
/// serving DNS on the pod's first UDP port (UDP and TCP), answering `whoami.lab.` with the pod's
/// own address (so a client can tell which backend answered).
///
/// # Errors
/// The pod has no TCP port, the server is unknown, or it could not be started.
pub fn spawn_real(
    server: &str,
    pod: &super::cluster::PodSpec,
    (netns, cgroup): (&str, Option<&std::path::Path>),
    home: &std::path::Path,
    log: &std::path::Path,
) -> anyhow::Result<u32> {
    let first = if server == "dnsmasq" {
        pod.udp.first()
    } else {
        pod.tcp.first()
    };
    let port =
        *first.with_context(|| format!("pod {} runs {server} but has no port for it", pod.key))?;
    let dir = home.join("pods").join(pod.key.replace('/', "."));
    std::fs::create_dir_all(&dir)?;
    let args: Vec<String> = match server {
        "dnsmasq" => vec![
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={}", pod.ip),
            format!("--port={port}"),
            format!("--address=/whoami.lab/{}", pod.ip),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            "--user=root".into(),
            "--log-facility=-".into(),
        ],
        "nginx" => {
            let d = dir.display();
            let conf = format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen {ip}:{port};\n    location / {{ return 200 \"{key}\\n\"; }}\n  }}\n}}\n",
                ip = pod.ip,
                key = pod.key
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf)?;
            vec![
                "-c".into(),
                path.display().to_string(),
                "-e".into(),
                dir.join("error.log").display().to_string(),
            ]
        }
        "iperf3" => vec![
            "-s".into(),
            "-B".into(),
            pod.ip.to_string(),
            "-p".into(),
            port.to_string(),
        ],
        other => anyhow::bail!("pod {}: unknown server {other:?}", pod.key),
    };
    super::topology::spawn_in(
        Some(netns),
        cgroup,
        std::path::Path::new(server),
        &args,
        log,
    )
}
