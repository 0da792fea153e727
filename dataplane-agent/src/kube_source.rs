//! The Kubernetes API source: one kube-rs watcher per kind, feeding the same [`Batch`]es as the
//! manifests source. The relist bookkeeping is pure and lives in [`dataplane_core::relist`].
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
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::{info, warn};

use dataplane_core::object::{Kind, Object, ObjectKey};
use dataplane_core::relist::{Item, KindEvent, KubeState, strip};
use dataplane_core::source::Batch;

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
                    error = %e,
                    "watch failed, retrying with backoff"
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
    use dataplane_core::relist::object_digest;
    use dataplane_core::source::Event;

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
        assert!(
            warnings[0]
                .to_string()
                .contains("Service ns/a is malformed")
        );
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
