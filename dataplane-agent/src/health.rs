//! The health check node ports: one listener per `healthCheckNodePort` of an
//! `externalTrafficPolicy: Local` LoadBalancer Service, on every address of the node (a cloud
//! load balancer probes them), following the Services and their local endpoints as they change.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dataplane_core::translate::HealthCheck;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::{respond_health_check, serve_with};

/// One listener per port; its answer follows the latest [`HealthCheck`] sent to it.
#[derive(Default)]
pub struct HealthCheckServers {
    listeners: BTreeMap<u16, (watch::Sender<Arc<HealthCheck>>, JoinHandle<()>)>,
}

impl HealthCheckServers {
    /// Serves exactly `wanted`: new ports are bound, gone ones closed, the others updated. Must
    /// run inside the tokio runtime. Returns the ports that could not be bound (retried on the
    /// next call).
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, std::io::Error)> {
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some((_, task)) = self.listeners.remove(&port) {
                task.abort();
            }
        }
        let mut failed = Vec::new();
        for (port, check) in wanted {
            if let Some((tx, _)) = self.listeners.get(port) {
                if **tx.borrow() != *check {
                    tx.send_replace(Arc::new(check.clone()));
                }
                continue;
            }
            match bind(*port) {
                Ok(listener) => {
                    let (tx, rx) = watch::channel(Arc::new(check.clone()));
                    let task =
                        tokio::spawn(serve_with(listener, rx, |_, c| respond_health_check(c)));
                    self.listeners.insert(*port, (tx, task));
                }
                Err(e) => failed.push((*port, e)),
            }
        }
        failed
    }

    /// The ports served.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.listeners.keys().copied()
    }
}

fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for (_, task) in self.listeners.values() {
            task.abort();
        }
    }
}
