//! The API source's pure part: what a watched object keeps, and relist semantics. Each kind's
//! watcher reports [`KindEvent`]s; [`KubeState`] turns them into index [`Event`]s, so a relist
//! (after a dropped watch or 410 Gone) applies what changed and deletes exactly what vanished.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

use crate::object::{Kind, Object, ObjectKey};
use crate::source::{Event, SourceWarning};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Contribution of one object version to the source digest (see [`KubeState::digest`]).
#[must_use]
pub fn object_digest(key: &ObjectKey, resource_version: &str) -> u64 {
    crate::manifest::object_digest(
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
    pub fn on(&mut self, kind: Kind, event: KindEvent) -> (Vec<Event>, Vec<SourceWarning>) {
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

fn bad(key: &ObjectKey, error: &str) -> SourceWarning {
    SourceWarning::Malformed {
        file: None,
        key: key.clone(),
        error: error.to_owned(),
    }
}
