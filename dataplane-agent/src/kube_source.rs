//! The Kubernetes API source: one kube-rs watcher per kind, feeding the same [`Batch`]es as the
//! manifests source.
//!
//! ```text
//!  watcher(Service) ----+
//!  watcher(Slice)  -----+--(kind, watcher::Event<DynamicObject>)--> KubeState --Batch--> pipeline
//!  ... 6 kinds     -----+     parse + strip per object (bad ones skipped by name, kept as they were)
//!                             relist (Init..InitDone): Apply what changed, Delete what vanished
//! ```
//!
//! Objects are watched as `DynamicObject`s and converted one by one, so one malformed object is
//! skipped with a warning instead of failing the whole list. Before storing, fields the agent does
//! not use (managedFields, last-applied annotations, most of a Pod) are dropped. The first batch
//! is sent only when every kind has been listed once, so readiness means a full sync.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Container, Namespace, Node, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::model::{Kind, Object, ObjectKey};
use crate::source::{Batch, Event};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Contribution of one object version to the source digest (see [`KubeState::digest`]).
#[must_use]
pub fn object_digest(key: &ObjectKey, resource_version: &str) -> u64 {
    dataplane_core::manifest::object_digest(
        key.kind.as_str(),
        &key.namespace,
        &key.name,
        resource_version,
    )
}

/// Drops what the agent never reads, to keep memory bounded at scale.
#[must_use]
pub fn strip(mut object: Object) -> Object {
    let meta = match &mut object {
        Object::Service(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::Pod(o) => &mut o.metadata,
        Object::Namespace(o) => &mut o.metadata,
        Object::Node(o) => &mut o.metadata,
        Object::NetworkPolicy(o) => &mut o.metadata,
    };
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    if let Object::Pod(pod) = &mut object {
        pod.metadata.annotations = None;
        pod.spec = pod.spec.take().map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        });
        pod.status = pod.status.take().map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            host_ip: s.host_ip,
            ..PodStatus::default()
        });
    }
    if let Object::Node(node) = &mut object {
        node.status = node
            .status
            .take()
            .map(|s| k8s_openapi::api::core::v1::NodeStatus {
                addresses: s.addresses,
                ..Default::default()
            });
    }
    object
}

/// One watch event, already converted: an object, or the key of one that could not be read.
#[derive(Debug)]
pub enum Item {
    Object(Object),
    /// A malformed object: skipped, its previous version (if any) kept.
    Bad(ObjectKey, String),
}

/// What one kind's watcher reported.
#[derive(Debug)]
pub enum KindEvent {
    Apply(Item),
    Delete(ObjectKey),
    Init,
    InitApply(Item),
    InitDone,
}

/// What the source keeps of an object: its version (for the source digest) and a digest of its
/// content (to tell a change from a repeat). The object itself is held by the index only.
#[derive(Debug)]
struct Held {
    version: String,
    content: u64,
}

/// The objects of one kind as last seen, and a relist in progress (`None`: listed malformed, its
/// previous version stays).
#[derive(Debug, Default)]
struct KindCache {
    objects: HashMap<ObjectKey, Held>,
    relist: Option<HashMap<ObjectKey, Option<Object>>>,
}

/// Everything the source has seen, turned into index events with relist semantics.
#[derive(Debug, Default)]
pub struct KubeState {
    caches: BTreeMap<Kind, KindCache>,
    listed: BTreeSet<Kind>,
    digest: u64,
}

fn version(o: &Object) -> &str {
    o.meta().resource_version.as_deref().unwrap_or_default()
}

impl KubeState {
    /// Every kind has been listed at least once.
    #[must_use]
    pub fn synced(&self) -> bool {
        self.listed.len() == Kind::ALL.len()
    }

    /// XOR of [`object_digest`] over every object held: equal to the digest of a list of the same
    /// objects at the same resource versions, so a caller can tell when the agent caught up.
    #[must_use]
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn store(&mut self, object: Object, out: &mut Vec<Event>) {
        let key = object.key();
        let cache = self.caches.entry(key.kind).or_default();
        let held = Held {
            version: version(&object).to_owned(),
            content: object.content_digest(),
        };
        match cache.objects.get(&key) {
            Some(old) if old.content == held.content => return,
            Some(old) => self.digest ^= object_digest(&key, &old.version),
            None => {}
        }
        self.digest ^= object_digest(&key, &held.version);
        cache.objects.insert(key, held);
        out.push(Event::Apply(object));
    }

    fn remove(&mut self, key: &ObjectKey, out: &mut Vec<Event>) {
        let cache = self.caches.entry(key.kind).or_default();
        if let Some(old) = cache.objects.remove(key) {
            self.digest ^= object_digest(key, &old.version);
            out.push(Event::Delete(key.clone()));
        }
    }

    /// Applies one watcher event of `kind`; returns the index events and warnings it causes.
    pub fn on(&mut self, kind: Kind, event: KindEvent) -> (Vec<Event>, Vec<String>) {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        match event {
            KindEvent::Apply(Item::Object(o)) => self.store(o, &mut out),
            KindEvent::Apply(Item::Bad(key, e)) => warnings.push(bad(&key, &e)),
            KindEvent::Delete(key) => self.remove(&key, &mut out),
            KindEvent::Init => self.caches.entry(kind).or_default().relist = Some(HashMap::new()),
            KindEvent::InitApply(item) => {
                let cache = self.caches.entry(kind).or_default();
                let relist = cache.relist.get_or_insert_with(HashMap::new);
                match item {
                    Item::Object(o) => {
                        relist.insert(o.key(), Some(o));
                    }
                    Item::Bad(key, e) => {
                        warnings.push(bad(&key, &e));
                        if cache.objects.contains_key(&key) {
                            relist.insert(key, None);
                        }
                    }
                }
            }
            KindEvent::InitDone => {
                let cache = self.caches.entry(kind).or_default();
                let relist = cache.relist.take().unwrap_or_default();
                let vanished: Vec<ObjectKey> = cache
                    .objects
                    .keys()
                    .filter(|k| !relist.contains_key(*k))
                    .cloned()
                    .collect();
                for key in vanished {
                    self.remove(&key, &mut out);
                }
                let mut listed: Vec<(ObjectKey, Object)> = relist
                    .into_iter()
                    .filter_map(|(k, o)| Some((k, o?)))
                    .collect();
                listed.sort_by(|a, b| a.0.cmp(&b.0));
                for (_, o) in listed {
                    self.store(o, &mut out);
                }
                self.listed.insert(kind);
            }
        }
        (out, warnings)
    }
}

fn bad(key: &ObjectKey, error: &str) -> String {
    format!("{key} is malformed, skipped (previous version kept): {error}")
}

/// Converts one dynamic object of `kind`.
#[must_use]
pub fn convert(kind: Kind, object: DynamicObject) -> Item {
    let key = ObjectKey {
        kind,
        namespace: if kind.is_namespaced() {
            object.metadata.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: object.metadata.name.clone().unwrap_or_default(),
    };
    let parsed = serde_json::to_value(object).and_then(|mut v| {
        // DynamicObject carries no type information; the typed structs want it.
        let (api_version, kind_name) = type_of(kind);
        v["apiVersion"] = api_version.into();
        v["kind"] = kind_name.into();
        Object::parse(kind, v)
    });
    match parsed {
        Ok(o) => Item::Object(strip(o)),
        Err(e) => Item::Bad(key, e.to_string()),
    }
}

fn type_of(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
        Kind::NetworkPolicy => ("networking.k8s.io/v1", "NetworkPolicy"),
        other => ("v1", other.as_str()),
    }
}

fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::Node => ApiResource::erase::<Node>(&()),
        Kind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
    }
}

/// The API group and resource of every watched kind: what the agent's RBAC role must allow.
#[must_use]
pub fn watched_resources() -> Vec<(String, String)> {
    Kind::ALL
        .iter()
        .map(|k| {
            let r = api_resource(*k);
            (r.group, r.plural)
        })
        .collect()
}

/// Watches one kind forever (with kube-rs' default backoff on errors), forwarding its events.
async fn watch_kind(client: Client, kind: Kind, tx: mpsc::Sender<(Kind, KindEvent)>) {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource(kind));
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(watcher::Event::Apply(o)) => KindEvent::Apply(convert(kind, o)),
            Ok(watcher::Event::Delete(o)) => match convert(kind, o) {
                Item::Object(o) => KindEvent::Delete(o.key()),
                Item::Bad(key, _) => KindEvent::Delete(key),
            },
            Ok(watcher::Event::Init) => KindEvent::Init,
            Ok(watcher::Event::InitApply(o)) => KindEvent::InitApply(convert(kind, o)),
            Ok(watcher::Event::InitDone) => KindEvent::InitDone,
            Err(e) => {
                warn!(
                    kind = kind.as_str(),
                    "watch failed, retrying with backoff: {e}"
                );
                continue;
            }
        };
        if tx.send((kind, event)).await.is_err() {
            return;
        }
    }
}

/// Builds a client from a kubeconfig file, or from the in-cluster (or default) configuration.
///
/// # Errors
/// No usable configuration.
pub async fn client(kubeconfig: Option<PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration or kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs the source: watches every kind and sends batches; the first only after every kind was
/// listed. Later batches carry whatever events arrived together.
pub async fn run(client: Client, tx: mpsc::Sender<Batch>) {
    let (events_tx, mut events) = mpsc::channel(1024);
    for kind in Kind::ALL {
        tokio::spawn(watch_kind(client.clone(), kind, events_tx.clone()));
    }
    drop(events_tx);
    let mut state = KubeState::default();
    let mut pending = Vec::new();
    let mut warnings = Vec::new();
    let mut received = None;
    let mut first = true;
    while let Some((kind, event)) = events.recv().await {
        let mut next = Some((kind, event));
        // Take everything already queued into the same batch.
        while let Some((kind, event)) = next {
            received.get_or_insert_with(Instant::now);
            let (ev, w) = state.on(kind, event);
            pending.extend(ev);
            warnings.extend(w);
            next = events.try_recv().ok();
        }
        if !state.synced() {
            continue;
        }
        // The first full sync is always reported, even for an empty cluster.
        if pending.is_empty() && warnings.is_empty() && !first {
            received = None;
            continue;
        }
        first = false;
        let batch = Batch {
            events: std::mem::take(&mut pending),
            warnings: std::mem::take(&mut warnings),
            fingerprint: state.digest(),
            received: received.take().unwrap_or_else(Instant::now),
        };
        if tx.send(batch).await.is_err() {
            return;
        }
    }
    info!("all watches ended");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(name: &str, rv: &str, port: i32) -> Item {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": port}]}
        }))
        .unwrap();
        convert(Kind::Service, o)
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            kind: Kind::Service,
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Apply(o) => format!("apply {}", o.key().name),
                Event::Delete(k) => format!("delete {}", k.name),
            })
            .collect()
    }

    fn list(state: &mut KubeState, items: Vec<Item>) -> Vec<Event> {
        let mut out = state.on(Kind::Service, KindEvent::Init).0;
        for i in items {
            out.extend(state.on(Kind::Service, KindEvent::InitApply(i)).0);
        }
        out.extend(state.on(Kind::Service, KindEvent::InitDone).0);
        out
    }

    #[test]
    fn synced_only_after_every_kind_was_listed() {
        let mut state = KubeState::default();
        for kind in Kind::ALL {
            assert!(!state.synced());
            state.on(kind, KindEvent::Init);
            state.on(kind, KindEvent::InitDone);
        }
        assert!(state.synced());
    }

    #[test]
    fn a_relist_deletes_exactly_what_vanished_and_leaves_unchanged_objects_alone() {
        let mut state = KubeState::default();
        let first = list(
            &mut state,
            vec![svc("a", "1", 80), svc("b", "2", 80), svc("c", "3", 80)],
        );
        let mut first = names(&first);
        first.sort();
        assert_eq!(first, ["apply a", "apply b", "apply c"]);
        // 410 Gone -> relist: b vanished, c changed, a unchanged.
        let second = list(&mut state, vec![svc("a", "1", 80), svc("c", "7", 81)]);
        assert_eq!(names(&second), ["delete b", "apply c"]);
        // A watch event that repeats what is known causes nothing.
        assert!(
            state
                .on(Kind::Service, KindEvent::Apply(svc("a", "1", 80)))
                .0
                .is_empty()
        );
        assert_eq!(
            names(&state.on(Kind::Service, KindEvent::Delete(key("a"))).0),
            ["delete a"]
        );
    }

    #[test]
    fn a_malformed_object_is_named_and_its_previous_version_kept_through_a_relist() {
        let mut state = KubeState::default();
        list(&mut state, vec![svc("a", "1", 80)]);
        let broken = Item::Bad(key("a"), "invalid type: string \"x\", expected i32".into());
        let (events, warnings) = state.on(Kind::Service, KindEvent::Apply(broken));
        assert!(events.is_empty());
        assert!(warnings[0].contains("Service ns/a is malformed"));
        let relisted = list(&mut state, vec![Item::Bad(key("a"), "still bad".into())]);
        assert!(
            relisted.is_empty(),
            "kept, not deleted: {:?}",
            names(&relisted)
        );
    }

    #[test]
    fn conversion_strips_unused_fields_and_names_bad_objects() {
        let Item::Object(Object::Service(s)) = svc("a", "1", 80) else {
            panic!("not a service")
        };
        assert!(s.metadata.managed_fields.is_none());
        let bad: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "x", "namespace": "ns"}, "spec": {"ports": "banana"}
        }))
        .unwrap();
        let Item::Bad(k, _) = convert(Kind::Service, bad) else {
            panic!("should not parse")
        };
        assert_eq!(
            k,
            ObjectKey {
                kind: Kind::Service,
                namespace: "ns".into(),
                name: "x".into()
            }
        );
        let pod: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"big": "x"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}],
                     "ports": [{"containerPort": 80}]}], "volumes": [{"name": "v"}]},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let Item::Object(Object::Pod(p)) = convert(Kind::Pod, pod) else {
            panic!("pod")
        };
        let spec = p.spec.unwrap();
        assert_eq!(
            (
                spec.node_name.as_deref(),
                spec.containers[0].image.as_deref()
            ),
            (Some("n"), None)
        );
        assert!(
            spec.containers[0].ports.is_some()
                && spec.volumes.is_none()
                && p.metadata.annotations.is_none()
        );
        assert!(p.status.unwrap().conditions.is_none());
    }

    #[test]
    fn the_digest_matches_a_list_at_the_same_versions() {
        let mut state = KubeState::default();
        list(&mut state, vec![svc("a", "1", 80), svc("b", "2", 80)]);
        state.on(Kind::Service, KindEvent::Apply(svc("b", "5", 82)));
        assert_eq!(
            state.digest(),
            object_digest(&key("a"), "1") ^ object_digest(&key("b"), "5")
        );
        state.on(Kind::Service, KindEvent::Delete(key("a")));
        assert_eq!(state.digest(), object_digest(&key("b"), "5"));
    }
}
