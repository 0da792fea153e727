//! The objects the agent watches: their kinds, keys, and one enum over their typed forms.
use std::fmt;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};

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
        crate::manifest::content_digest(&json.unwrap_or_default())
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
