//! A small stateful stand-in for kube-apiserver, for the lab's `--kubeconfig` path: it keeps
//! objects with resource versions and answers what the lab and the agents send (server-side apply,
//! merge patches of the status subresource, get, list, watch, delete) over plain HTTP on loopback.
//! It copies the real server's behaviours the lab must cope with: list items carry no
//! apiVersion/kind, `default` and `kube-system` cannot be deleted, most of a pod's spec is
//! immutable (422), and a pod deleted with a grace period stays terminating (there is no kubelet).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// (resource plural, namespace or "", name)
pub type Key = (String, String, String);

#[derive(Default)]
pub struct Store {
    rv: u64,
    pub objects: BTreeMap<Key, Value>,
    /// (resource version, plural, namespace, event type, object)
    events: Vec<(u64, String, String, &'static str, Value)>,
    /// Every request as "METHOD target" (path and query).
    pub requests: Vec<String>,
}

impl Store {
    fn put(&mut self, key: Key, mut object: Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let ty = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            object["metadata"]["uid"] = format!("uid-{}", self.rv).into();
            "ADDED"
        };
        self.events
            .push((self.rv, key.0.clone(), key.1.clone(), ty, object.clone()));
        self.objects.insert(key, object);
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.events.push((
            self.rv,
            key.0.clone(),
            key.1.clone(),
            "DELETED",
            object.clone(),
        ));
        Some(object)
    }

    /// Seeds an object as the server's own (as `default/kubernetes` is on a real server).
    pub fn seed(&mut self, plural: &str, object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.put((plural.to_owned(), ns, name), object);
    }
}

pub struct FakeApi {
    pub store: Arc<Mutex<Store>>,
    pub port: u16,
}

impl FakeApi {
    /// Starts the server on a loopback port, in a thread of its own.
    pub fn start() -> FakeApi {
        let store = Arc::new(Mutex::new(Store::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = store.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, s.clone()));
                }
            });
        });
        FakeApi { store, port }
    }

    /// A kubeconfig for this server.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
                 clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\n\
                 users: [{{name: fake, user: {{}}}}]\n",
                self.port
            ),
        )
        .unwrap();
    }
}

/// Where a request goes: (plural, namespace, name, subresource).
fn route(path: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| {
            let r = path.strip_prefix("/apis/")?;
            let mut it = r.splitn(3, '/');
            it.next()?;
            it.next()?;
            it.next()
        })?
        .trim_end_matches('/');
    let seg: Vec<&str> = rest.split('/').collect();
    let owned = |i: usize| seg.get(i).map(|s| (*s).to_owned());
    if seg[0] == "namespaces" && seg.len() >= 3 {
        Some((seg[2].to_owned(), seg[1].to_owned(), owned(3), owned(4)))
    } else {
        Some((seg[0].to_owned(), String::new(), owned(1), owned(2)))
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn handle(
    store: &Mutex<Store>,
    method: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    body: &[u8],
) -> (u16, Value) {
    let Some((plural, ns, name, sub)) = route(path) else {
        return status(404, "NotFound", path);
    };
    let mut s = store.lock().unwrap();
    let Some(name) = name else {
        if method != "GET" {
            return status(405, "MethodNotAllowed", method);
        }
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((p, n, _), _)| *p == plural && (ns.is_empty() || *n == ns))
            .map(|(_, o)| {
                let mut o = o.clone();
                let m = o.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        return (
            200,
            json!({"kind": "List", "apiVersion": "v1",
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    };
    let key = (plural.clone(), ns.clone(), name.clone());
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    match (method, sub.as_deref()) {
        ("GET", None) => match s.objects.get(&key) {
            Some(o) => (200, o.clone()),
            None => status(404, "NotFound", &name),
        },
        ("PATCH", None) => {
            let mut object = body;
            if !ns.is_empty() {
                object["metadata"]["namespace"] = ns.clone().into();
            }
            if let Some(old) = s.objects.get(&key) {
                if plural == "pods" && old["spec"] != object["spec"] {
                    return status(
                        422,
                        "Invalid",
                        &format!(
                            "Pod \"{name}\" is invalid: spec: Forbidden: pod updates may not change fields other than image"
                        ),
                    );
                }
                for keep in ["uid", "deletionTimestamp"] {
                    if let Some(v) = old["metadata"].get(keep) {
                        object["metadata"][keep] = v.clone();
                    }
                }
                if let Some(st) = old.get("status") {
                    object["status"] = st.clone();
                }
            }
            s.put(key.clone(), object);
            (200, s.objects[&key].clone())
        }
        ("PATCH", Some("status")) => {
            let Some(mut object) = s.objects.get(&key).cloned() else {
                return status(404, "NotFound", &name);
            };
            merge(&mut object["status"], &body["status"]);
            s.put(key.clone(), object);
            (200, s.objects[&key].clone())
        }
        ("DELETE", None) => {
            if plural == "namespaces" && (name == "default" || name == "kube-system") {
                return status(
                    403,
                    "Forbidden",
                    &format!(
                        "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                    ),
                );
            }
            let immediate = body["gracePeriodSeconds"] == 0
                || query.get("gracePeriodSeconds").map(String::as_str) == Some("0");
            if plural == "pods" && !immediate {
                let Some(mut object) = s.objects.get(&key).cloned() else {
                    return status(404, "NotFound", &name);
                };
                object["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
                s.put(key.clone(), object);
                return (200, s.objects[&key].clone());
            }
            match s.remove(&key) {
                Some(o) => (200, o),
                None => status(404, "NotFound", &name),
            }
        }
        _ => status(405, "MethodNotAllowed", method),
    }
}

async fn serve(mut stream: TcpStream, store: Arc<Mutex<Store>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while request.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = &request[head_end..head_end + length];
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_owned();
    let target = words.next().unwrap_or_default().to_owned();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    store
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {target}"));
    if method == "GET" && query.get("watch").map(String::as_str) == Some("true") {
        watch(stream, &store, path, &query).await;
        return;
    }
    let (code, reply) = handle(&store, &method, path, &query, body);
    let reply = reply.to_string();
    let _ = stream
        .write_all(
            format!(
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            )
            .as_bytes(),
        )
        .await;
}

/// A watch: every event after the requested resource version for this resource (and namespace),
/// as they happen, until the requested timeout (capped at 60 s) or the client goes away.
async fn watch(
    mut stream: TcpStream,
    store: &Mutex<Store>,
    path: &str,
    query: &BTreeMap<String, String>,
) {
    let Some((plural, ns, _, _)) = route(path) else {
        return;
    };
    let mut last: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout: u64 = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .min(60);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    while Instant::now() < deadline {
        let lines: Vec<String> = {
            let s = store.lock().unwrap();
            let out = s
                .events
                .iter()
                .filter(|(rv, p, n, _, _)| {
                    *rv > last && *p == plural && (ns.is_empty() || *n == ns)
                })
                .map(|(_, _, _, ty, o)| json!({"type": ty, "object": o}).to_string() + "\n")
                .collect();
            last = s.rv;
            out
        };
        for line in lines {
            if stream.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
