//! The lab against an API server: the manifests' objects are created there (with their status),
//! and the agents, inside node namespaces that stay unconnected to this machine's network, reach it
//! through relays:
//!
//! ```text
//!  node ns: agent --tcp 127.0.0.1:16443--> relay --unix <home>/api.sock--> relay (host) --> API server
//! ```
//!
//! Each node gets a copy of the kubeconfig whose server is the local relay, with `tls-server-name`
//! set to the real server's host so certificates still verify. Convergence: every agent's digest
//! (kind, namespace, name, resourceVersion of everything it holds) equals the digest of a fresh
//! list of the same kinds.
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{Context as _, bail};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde::Deserialize as _;

/// The port the node-local relay listens on, on the node's loopback.
pub const NODE_RELAY_PORT: u16 = 16443;

/// The kinds the agent watches, as (apiVersion, kind, plural, namespaced).
const KINDS: [(&str, &str, &str, bool); 6] = [
    ("v1", "Namespace", "namespaces", false),
    ("v1", "Node", "nodes", false),
    ("v1", "Pod", "pods", true),
    ("v1", "Service", "services", true),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
];

fn resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let (_, _, plural, namespaced) = KINDS.iter().find(|k| k.0 == api_version && k.1 == kind)?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some((
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural: (*plural).to_owned(),
        },
        *namespaced,
    ))
}

/// An object the lab created: enough to delete it again.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Created {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

fn api(client: &Client, c: &Created) -> Option<Api<DynamicObject>> {
    let (ar, namespaced) = resource(&c.api_version, &c.kind)?;
    Some(if namespaced {
        Api::namespaced_with(client.clone(), &c.namespace, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// A client from the user's kubeconfig.
///
/// # Errors
/// The kubeconfig cannot be read.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(Client::try_from(config)?)
}

/// Server-side applies every object of the watched kinds in `files`: namespaces first (also the
/// ones objects live in without a manifest), then nodes, pods, services, slices, policies; then
/// the status of pods, nodes and services. A pod the server refuses to change (most of a pod's
/// spec is immutable) is deleted and created again. Objects the lab created before that `files`
/// no longer hold are deleted. `created` is kept current as this goes, so a failure part way
/// still leaves a record of everything to delete.
///
/// Namespaces are applied but never recorded or deleted: an API server without a namespace
/// controller keeps a deleted namespace terminating for ever, and the next `kplab up` could not
/// create anything in it; `default` and other system namespaces cannot be deleted at all.
///
/// # Errors
/// The API server refused an object.
pub async fn apply(
    client: &Client,
    files: &std::collections::BTreeMap<String, Vec<u8>>,
    created: &mut Vec<Created>,
) -> anyhow::Result<()> {
    let mut objects = Vec::new();
    for content in files.values() {
        for doc in serde_yaml::Deserializer::from_slice(content) {
            let Ok(value) = serde_yaml::Value::deserialize(doc) else {
                break;
            };
            let Ok(value) = serde_json::to_value(&value) else {
                continue;
            };
            if let Some(c) = identify(&value) {
                objects.push((c, value));
            }
        }
    }
    let order = |c: &Created| {
        KINDS
            .iter()
            .position(|k| k.1 == c.kind)
            .unwrap_or(KINDS.len())
    };
    objects.sort_by_key(|(c, _)| order(c));
    let mut namespaces: std::collections::BTreeSet<String> = objects
        .iter()
        .filter(|(c, _)| !c.namespace.is_empty())
        .map(|(c, _)| c.namespace.clone())
        .collect();
    for (c, _) in &objects {
        if c.kind == "Namespace" {
            namespaces.remove(&c.name);
        }
    }
    let implicit = namespaces.into_iter().map(|ns| {
        let value =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        (
            Created {
                api_version: "v1".into(),
                kind: "Namespace".into(),
                namespace: String::new(),
                name: ns,
            },
            value,
        )
    });
    let implicit: Vec<_> = implicit.collect();
    let mut wanted = Vec::new();
    for (c, value) in implicit.into_iter().chain(objects) {
        apply_one(client, &c, value).await?;
        if c.kind != "Namespace" {
            if !created.contains(&c) {
                created.push(c.clone());
            }
            wanted.push(c);
        }
    }
    let gone: Vec<Created> = created
        .iter()
        .filter(|c| !wanted.contains(c))
        .cloned()
        .collect();
    for c in gone {
        delete(client, &c).await?;
        created.retain(|x| x != &c);
    }
    Ok(())
}

/// The object's kind, namespace and name, if it is of a watched kind and named.
fn identify(value: &serde_json::Value) -> Option<Created> {
    let field = |k: &str| value.get(k)?.as_str().map(str::to_owned);
    let meta = |k: &str| value.get("metadata")?.get(k)?.as_str().map(str::to_owned);
    let (api_version, kind) = (field("apiVersion")?, field("kind")?);
    let (_, namespaced) = resource(&api_version, &kind)?;
    let namespace = if namespaced {
        meta("namespace").unwrap_or_else(|| "default".to_owned())
    } else {
        String::new()
    };
    Some(Created {
        api_version,
        kind,
        namespace,
        name: meta("name")?,
    })
}

async fn apply_one(
    client: &Client,
    c: &Created,
    mut value: serde_json::Value,
) -> anyhow::Result<()> {
    let api = api(client, c).context("known kind")?;
    let status = value
        .as_object_mut()
        .and_then(|o| o.remove("status"))
        .filter(|_| matches!(c.kind.as_str(), "Pod" | "Node" | "Service"));
    let what = || format!("{} {}/{}", c.kind, c.namespace, c.name);
    let params = PatchParams::apply("kplab").force();
    let status_patch = Patch::Merge(serde_json::json!({ "status": status }));
    let mut applied = api.patch(&c.name, &params, &Patch::Apply(&value)).await;
    let mut replaced = false;
    loop {
        if applied.is_ok() && status.is_some() {
            applied = api
                .patch_status(&c.name, &PatchParams::default(), &status_patch)
                .await;
        }
        match applied {
            Err(kube::Error::Api(s)) if c.kind == "Pod" && s.code == 422 && !replaced => {
                eprintln!(
                    "lab: the API server refused to change {} ({}); replacing it",
                    what(),
                    s.message
                );
                delete(client, c).await?;
                replaced = true;
                applied = api.patch(&c.name, &params, &Patch::Apply(&value)).await;
            }
            other => {
                return other
                    .map(drop)
                    .with_context(|| format!("applying {}", what()));
            }
        }
    }
}

async fn delete(client: &Client, c: &Created) -> anyhow::Result<()> {
    let api = api(client, c).context("known kind")?;
    // Grace period 0: without a kubelet on the lab's nodes, a pod deleted gracefully would stay
    // terminating until a pod garbage collector (if any) removed it.
    let params = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..kube::api::DeleteParams::default()
    };
    match api.delete(&c.name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {} {}/{}", c.kind, c.namespace, c.name)),
    }
}

/// Deletes every object the lab created (namespaced objects first).
///
/// # Errors
/// The API server refused a deletion.
pub async fn delete_all(client: &Client, created: &[Created]) -> anyhow::Result<()> {
    let mut order = created.to_vec();
    order.sort_by_key(|c| std::cmp::Reverse(KINDS.iter().position(|k| k.1 == c.kind)));
    for c in &order {
        delete(client, c).await?;
    }
    Ok(())
}

/// The digest of a fresh list of every watched kind, as the agents compute theirs.
///
/// # Errors
/// A list failed.
pub async fn digest(client: &Client) -> anyhow::Result<u64> {
    let mut digest = 0;
    for (api_version, kind, _, namespaced) in KINDS {
        let (ar, _) = resource(api_version, kind).context("known kind")?;
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        for o in api.list(&ListParams::default()).await? {
            let ns = if namespaced {
                o.metadata.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            };
            digest ^= dataplane_core::manifest::object_digest(
                kind,
                &ns,
                o.metadata.name.as_deref().unwrap_or_default(),
                o.metadata.resource_version.as_deref().unwrap_or_default(),
            );
        }
    }
    Ok(digest)
}

/// Writes a node's kubeconfig: the user's, with the server replaced by the node-local relay and
/// `tls-server-name` keeping certificate checks on the real host name. Returns the real
/// server's `host:port`.
///
/// # Errors
/// The kubeconfig has no usable current cluster.
pub fn node_kubeconfig(user: &Path, out: &Path) -> anyhow::Result<String> {
    let mut kc = kube::config::Kubeconfig::read_from(user)?;
    let context_name = kc
        .current_context
        .clone()
        .context("kubeconfig has no current-context")?;
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .context("current context not found")?;
    let cluster = kc
        .clusters
        .iter_mut()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_mut())
        .context("current cluster not found")?;
    let server = cluster.server.clone().context("cluster has no server")?;
    let (scheme, rest) = server
        .split_once("://")
        .unwrap_or(("https", server.as_str()));
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority
        .rsplit_once(':')
        .filter(|(h, _)| !h.ends_with(']') || h.starts_with('['))
    {
        Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
            (h.to_owned(), p.parse::<u16>()?)
        }
        _ => (
            authority.to_owned(),
            if scheme == "https" { 443 } else { 80 },
        ),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    cluster.server = Some(format!("{scheme}://127.0.0.1:{NODE_RELAY_PORT}"));
    if scheme == "https" && cluster.tls_server_name.is_none() {
        cluster.tls_server_name = Some(host.clone());
    }
    std::fs::write(out, serde_yaml::to_string(&kc)?)?;
    Ok(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// A relay endpoint: `tcp:HOST:PORT` or `unix:PATH`.
enum End {
    Tcp(String),
    Unix(String),
}

fn end(s: &str) -> anyhow::Result<End> {
    if let Some(a) = s.strip_prefix("tcp:") {
        Ok(End::Tcp(a.to_owned()))
    } else if let Some(p) = s.strip_prefix("unix:") {
        Ok(End::Unix(p.to_owned()))
    } else {
        bail!("{s:?}: expected tcp:HOST:PORT or unix:PATH")
    }
}

trait Duplex: std::io::Read + std::io::Write + Send {
    fn split(&self) -> std::io::Result<Box<dyn Duplex>>;
}

impl Duplex for TcpStream {
    fn split(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Duplex for UnixStream {
    fn split(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
}

fn connect(to: &End) -> std::io::Result<Box<dyn Duplex>> {
    Ok(match to {
        End::Tcp(a) => Box::new(TcpStream::connect(a)?),
        End::Unix(p) => Box::new(UnixStream::connect(p)?),
    })
}

fn pump(mut from: Box<dyn Duplex>, mut to: Box<dyn Duplex>) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn serve_conn(client: Box<dyn Duplex>, to: &End) {
    let Ok(upstream) = connect(to) else {
        return;
    };
    let (Ok(client_w), Ok(upstream_w)) = (client.split(), upstream.split()) else {
        return;
    };
    std::thread::spawn(move || pump(upstream, client_w));
    pump(client, upstream_w);
}

/// `lab relay --listen A --to B`: forwards every connection accepted on A to B, both ways.
///
/// # Errors
/// The listening address cannot be bound.
pub fn relay(listen: &str, to: &str) -> anyhow::Result<()> {
    let to = std::sync::Arc::new(end(to)?);
    match end(listen)? {
        End::Tcp(a) => {
            let l = std::net::TcpListener::bind(&a).with_context(|| format!("binding {a}"))?;
            for c in l.incoming().flatten() {
                let to = to.clone();
                std::thread::spawn(move || serve_conn(Box::new(c), &to));
            }
        }
        End::Unix(p) => {
            let _ = std::fs::remove_file(&p);
            let l = UnixListener::bind(&p).with_context(|| format!("binding {p}"))?;
            for c in l.incoming().flatten() {
                let to = to.clone();
                std::thread::spawn(move || serve_conn(Box::new(c), &to));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_kubeconfig_points_at_the_relay_and_keeps_the_server_name() {
        let dir = std::env::temp_dir().join(format!("kplab-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let user = dir.join("user");
        std::fs::write(
            &user,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n\
             clusters: [{name: k, cluster: {server: 'https://api.example:6443', certificate-authority-data: Zm9v}}]\n\
             users: [{name: u, user: {token: t}}]\n",
        )
        .unwrap();
        let out = dir.join("node");
        assert_eq!(node_kubeconfig(&user, &out).unwrap(), "api.example:6443");
        let kc = kube::config::Kubeconfig::read_from(&out).unwrap();
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:16443"));
        assert_eq!(cluster.tls_server_name.as_deref(), Some("api.example"));
        assert!(
            cluster.certificate_authority_data.is_some(),
            "credentials carried over"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn relays_chain_tcp_to_unix_to_tcp_both_ways() {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in echo.incoming().flatten() {
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).unwrap();
                c.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
            }
        });
        let sock = std::env::temp_dir().join(format!("kplab-relay-{}.sock", std::process::id()));
        let unix = format!("unix:{}", sock.display());
        let to_echo = format!("tcp:{echo_addr}");
        let u2 = unix.clone();
        std::thread::spawn(move || relay(&u2, &to_echo));
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        drop(front);
        let listen = format!("tcp:{front_addr}");
        std::thread::spawn(move || relay(&listen, &unix));
        let mut reply = [0u8; 5];
        for _ in 0..50 {
            if let Ok(mut c) = TcpStream::connect(front_addr) {
                c.write_all(b"hello").unwrap();
                c.read_exact(&mut reply).unwrap();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(&reply, b"HELLO");
        let _ = std::fs::remove_file(sock);
    }
}
