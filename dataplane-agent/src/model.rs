//! The index: every object the agent knows, by kind, namespace and name, and what each change dirties.
//!
//! ```text
//!  source event --apply/delete--> Index --> dirty services (re-translated, diffed, written)
//!                                       --> pods changed   (interfaces re-scanned)
//!  Service ns/a <--kubernetes.io/service-name-- EndpointSlice ns/a-xxxxx, ns/a-yyyyy
//! ```
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    Node,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Namespace,
        Kind::Node,
        Kind::NetworkPolicy,
    ];

    /// The kind of an `apiVersion` and `kind` pair, if the agent watches it.
    #[must_use]
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("v1", "Service") => Kind::Service,
            ("v1", "Pod") => Kind::Pod,
            ("v1", "Namespace") => Kind::Namespace,
            ("v1", "Node") => Kind::Node,
            ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
            ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
            _ => return None,
        })
    }

    /// Namespaces and Nodes are cluster-scoped; the rest live in namespaces.
    #[must_use]
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// Identifies one object. Cluster-scoped kinds have an empty namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// A namespaced name, used for services.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One object of a kind the agent watches.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    Node(Box<Node>),
    NetworkPolicy(Box<NetworkPolicy>),
}

macro_rules! object_from {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(o: $kind) -> Self {
                Object::$kind(Box::new(o))
            }
        }
    )*};
}
object_from!(Service, EndpointSlice, Pod, Namespace, Node, NetworkPolicy);

impl Object {
    /// Parses a JSON object of a kind the agent watches into its typed form.
    ///
    /// # Errors
    /// The value does not match the kind's schema.
    pub fn parse(kind: Kind, value: serde_json::Value) -> Result<Object, serde_json::Error> {
        use serde_json::from_value;
        Ok(match kind {
            Kind::Service => Object::from(from_value::<Service>(value)?),
            Kind::EndpointSlice => Object::from(from_value::<EndpointSlice>(value)?),
            Kind::Pod => Object::from(from_value::<Pod>(value)?),
            Kind::Namespace => Object::from(from_value::<Namespace>(value)?),
            Kind::Node => Object::from(from_value::<Node>(value)?),
            Kind::NetworkPolicy => Object::from(from_value::<NetworkPolicy>(value)?),
        })
    }

    /// Digest of the object's content (its JSON form, metadata included): equal digests, same
    /// object. Sources keep this instead of a second copy of every object.
    #[must_use]
    pub fn content_digest(&self) -> u64 {
        let json = match self {
            Object::Service(o) => serde_json::to_vec(o),
            Object::EndpointSlice(o) => serde_json::to_vec(o),
            Object::Pod(o) => serde_json::to_vec(o),
            Object::Namespace(o) => serde_json::to_vec(o),
            Object::Node(o) => serde_json::to_vec(o),
            Object::NetworkPolicy(o) => serde_json::to_vec(o),
        };
        // Serializing a typed object cannot fail (no maps with non-string keys in these types).
        dataplane_core::manifest::content_digest(&json.unwrap_or_default())
    }

    /// The object's metadata.
    #[must_use]
    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
        }
    }

    #[must_use]
    pub fn key(&self) -> ObjectKey {
        let kind = match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        };
        let meta = self.meta();
        let namespace = if kind.is_namespaced() {
            meta.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        ObjectKey {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What a change touched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub services: BTreeSet<NsName>,
    pub pods: bool,
}

impl Dirty {
    pub fn merge(&mut self, other: Dirty) {
        self.services.extend(other.services);
        self.pods |= other.pods;
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
                dirty.services.insert(id);
            }
            Object::EndpointSlice(slice) => {
                dirty.merge(self.remove_slice(&id));
                if let Some(svc) = slice_service(&slice, &id.namespace) {
                    self.slices_by_service
                        .entry(svc.clone())
                        .or_default()
                        .insert(id.name.clone());
                    dirty.services.insert(svc);
                }
                self.slices.insert(id, *slice);
            }
            Object::Pod(pod) => {
                self.pods.insert(id, *pod);
                dirty.pods = true;
            }
            Object::Namespace(ns) => {
                self.namespaces.insert(id.name, *ns);
            }
            Object::Node(node) => {
                self.nodes.insert(id.name, *node);
            }
            Object::NetworkPolicy(np) => {
                self.network_policies.insert(id, *np);
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
                    dirty.services.insert(id);
                }
            }
            Kind::EndpointSlice => dirty.merge(self.remove_slice(&id)),
            Kind::Pod => dirty.pods = self.pods.remove(&id).is_some(),
            Kind::Namespace => {
                self.namespaces.remove(&id.name);
            }
            Kind::Node => {
                self.nodes.remove(&id.name);
            }
            Kind::NetworkPolicy => {
                self.network_policies.remove(&id);
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
            dirty.services.insert(svc);
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
    use crate::testutil::{ready, service, slice};

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
        assert_eq!(d.services, [svc("web")].into());
        let d = index.apply(Object::from(slice(
            "ns",
            "web-a",
            "web",
            &[],
            &[ready("10.0.0.1")],
        )));
        assert_eq!(d.services, [svc("web")].into());
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
        assert_eq!(d.services, [svc("a"), svc("b")].into());
        assert!(index.slices_of(&svc("a")).is_empty());
        let d = index.delete(&ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: "ns".into(),
            name: "x".into(),
        });
        assert_eq!(d.services, [svc("b")].into());
    }
}
