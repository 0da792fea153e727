//! The index: every object the agent knows, by kind, namespace and name, and what each change dirties.
//!
//! ```text
//!  source event --apply/delete--> Index --> Dirty { Target::Service(ns/a), Target::Pods, .. }
//!  Service ns/a <--kubernetes.io/service-name-- EndpointSlice ns/a-xxxxx, ns/a-yyyyy
//! ```
//!
//! A [`Target`] is one thing derived from the index that a change makes stale: the reconciler
//! re-derives exactly the dirty targets. A new derived table (policy, node ports) is a new variant
//! here and an arm in the reconciler's dispatch, not a new field threaded through every layer.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

use crate::object::{Kind, NsName, Object, ObjectKey};

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One thing derived from the index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A Service's translation entries (frontends, slots, backends).
    Service(NsName),
    /// The set of local pods: which interfaces carry the datapath.
    Pods,
    /// A Node's InternalIPs changed (the local node's are where NodePorts answer).
    Node(String),
    /// NetworkPolicy: what pods, namespaces (their labels) and policies say changed.
    Policy,
}

/// What a change touched: the targets to re-derive.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty(BTreeSet<Target>);

impl FromIterator<Target> for Dirty {
    fn from_iter<I: IntoIterator<Item = Target>>(targets: I) -> Self {
        Dirty(targets.into_iter().collect())
    }
}

impl Dirty {
    pub fn insert(&mut self, target: Target) {
        self.0.insert(target);
    }

    pub fn merge(&mut self, other: Dirty) {
        self.0.extend(other.0);
    }

    #[must_use]
    pub fn contains(&self, target: &Target) -> bool {
        self.0.contains(target)
    }

    /// Every dirty target, in order (Services by name, then pods).
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.0.iter()
    }

    /// The dirty Services, in name order.
    pub fn services(&self) -> impl Iterator<Item = &NsName> {
        self.0.iter().filter_map(|t| match t {
            Target::Service(s) => Some(s),
            Target::Pods | Target::Node(_) | Target::Policy => None,
        })
    }
}

/// Every watched object, indexed for the lookups translation needs.
#[derive(Clone, Debug, Default)]
pub struct Index {
    pub services: BTreeMap<NsName, Service>,
    slices: BTreeMap<NsName, EndpointSlice>,
    /// Service -> names of its EndpointSlices (same namespace).
    slices_by_service: BTreeMap<NsName, BTreeSet<String>>,
    pub pods: BTreeMap<NsName, Pod>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<String, Node>,
    pub network_policies: BTreeMap<NsName, NetworkPolicy>,
}

fn slice_service(slice: &EndpointSlice, namespace: &str) -> Option<NsName> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(NsName {
        namespace: namespace.to_owned(),
        name: name.clone(),
    })
}

impl Index {
    /// Adds or replaces an object.
    pub fn apply(&mut self, object: Object) -> Dirty {
        let key = object.key();
        let id = NsName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        let mut dirty = Dirty::default();
        match object {
            Object::Service(svc) => {
                self.services.insert(id.clone(), *svc);
                dirty.insert(Target::Service(id));
            }
            Object::EndpointSlice(slice) => {
                dirty.merge(self.remove_slice(&id));
                if let Some(svc) = slice_service(&slice, &id.namespace) {
                    self.slices_by_service
                        .entry(svc.clone())
                        .or_default()
                        .insert(id.name.clone());
                    dirty.insert(Target::Service(svc));
                }
                self.slices.insert(id, *slice);
            }
            Object::Pod(pod) => {
                self.pods.insert(id, *pod);
                dirty.insert(Target::Pods);
                dirty.insert(Target::Policy);
            }
            Object::Namespace(ns) => {
                self.namespaces.insert(id.name, *ns);
                dirty.insert(Target::Policy);
            }
            Object::Node(node) => {
                // A Node is rewritten often (status, heartbeats); only its addresses are derived.
                let before = self.node_internal_ips(&id.name);
                self.nodes.insert(id.name.clone(), *node);
                if self.node_internal_ips(&id.name) != before {
                    dirty.insert(Target::Node(id.name));
                }
            }
            Object::NetworkPolicy(np) => {
                self.network_policies.insert(id, *np);
                dirty.insert(Target::Policy);
            }
        }
        dirty
    }

    /// Removes an object; unknown keys are a no-op.
    pub fn delete(&mut self, key: &ObjectKey) -> Dirty {
        let id = NsName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        let mut dirty = Dirty::default();
        match key.kind {
            Kind::Service => {
                if self.services.remove(&id).is_some() {
                    dirty.insert(Target::Service(id));
                }
            }
            Kind::EndpointSlice => dirty.merge(self.remove_slice(&id)),
            Kind::Pod => {
                if self.pods.remove(&id).is_some() {
                    dirty.insert(Target::Pods);
                    dirty.insert(Target::Policy);
                }
            }
            Kind::Namespace => {
                if self.namespaces.remove(&id.name).is_some() {
                    dirty.insert(Target::Policy);
                }
            }
            Kind::Node => {
                let before = self.node_internal_ips(&id.name);
                if self.nodes.remove(&id.name).is_some() && !before.is_empty() {
                    dirty.insert(Target::Node(id.name));
                }
            }
            Kind::NetworkPolicy => {
                if self.network_policies.remove(&id).is_some() {
                    dirty.insert(Target::Policy);
                }
            }
        }
        dirty
    }

    fn remove_slice(&mut self, id: &NsName) -> Dirty {
        let mut dirty = Dirty::default();
        if let Some(old) = self.slices.remove(id)
            && let Some(svc) = slice_service(&old, &id.namespace)
        {
            if let Some(names) = self.slices_by_service.get_mut(&svc) {
                names.remove(&id.name);
                if names.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            dirty.insert(Target::Service(svc));
        }
        dirty
    }

    /// The EndpointSlices of a service, in name order.
    #[must_use]
    pub fn slices_of(&self, svc: &NsName) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                self.slices.get(&NsName {
                    namespace: svc.namespace.clone(),
                    name: name.clone(),
                })
            })
            .collect()
    }

    /// A Node's InternalIPs (IPv4): kube-proxy's `--nodeport-addresses primary`.
    #[must_use]
    pub fn node_internal_ips(&self, node: &str) -> Vec<std::net::Ipv4Addr> {
        self.nodes
            .get(node)
            .and_then(|n| n.status.as_ref()?.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect()
    }

    /// Number of objects of each kind.
    #[must_use]
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            (Kind::Service.as_str(), self.services.len()),
            (Kind::EndpointSlice.as_str(), self.slices.len()),
            (Kind::Pod.as_str(), self.pods.len()),
            (Kind::Namespace.as_str(), self.namespaces.len()),
            (Kind::Node.as_str(), self.nodes.len()),
            (Kind::NetworkPolicy.as_str(), self.network_policies.len()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{ready, service, slice};

    fn dirty<const N: usize>(services: [NsName; N]) -> Dirty {
        services.into_iter().map(Target::Service).collect()
    }

    fn svc(name: &str) -> NsName {
        NsName {
            namespace: "ns".to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn slices_join_their_service_by_label_and_dirty_it() {
        let mut index = Index::default();
        let d = index.apply(Object::from(service(
            "ns",
            "web",
            "10.96.0.10",
            &[("", 80, "TCP", json!(80))],
        )));
        assert_eq!(d, dirty([svc("web")]));
        let d = index.apply(Object::from(slice(
            "ns",
            "web-a",
            "web",
            &[],
            &[ready("10.0.0.1")],
        )));
        assert_eq!(d, dirty([svc("web")]));
        index.apply(Object::from(slice("ns", "web-b", "web", &[], &[])));
        assert_eq!(index.slices_of(&svc("web")).len(), 2);
        // Another namespace's slice with the same label does not join.
        index.apply(Object::from(slice("other", "web-c", "web", &[], &[])));
        assert_eq!(index.slices_of(&svc("web")).len(), 2);
    }

    #[test]
    fn relabelling_a_slice_dirties_both_services() {
        let mut index = Index::default();
        index.apply(Object::from(slice("ns", "x", "a", &[], &[])));
        let d = index.apply(Object::from(slice("ns", "x", "b", &[], &[])));
        assert_eq!(d, dirty([svc("a"), svc("b")]));
        assert!(index.slices_of(&svc("a")).is_empty());
        let d = index.delete(&ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: "ns".into(),
            name: "x".into(),
        });
        assert_eq!(d, dirty([svc("b")]));
    }
}
