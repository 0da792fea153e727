//! `deploy/` holds valid Kubernetes objects with the fields that matter: RBAC exactly as wide as
//! the watches, capabilities instead of privileged, probes on the agent's endpoints, the mounts,
//! and configuration the agent actually reads.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn load<T: DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not a valid object: {e}"))
}

#[test]
fn cluster_role_allows_exactly_reading_the_watched_kinds() {
    let role: ClusterRole = load("clusterrole.yaml");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(
            verbs,
            ["list", "watch"].into(),
            "what the watchers use, nothing more"
        );
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                assert!(resource != "*" && group != "*" && resource != "secrets");
                granted.insert((group.clone(), resource));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = dataplane_agent::kube_source::watched_resources()
        .into_iter()
        .collect();
    assert_eq!(granted, watched);

    let binding: ClusterRoleBinding = load("clusterrolebinding.yaml");
    let sa: ServiceAccount = load("serviceaccount.yaml");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), Some(subject.name.clone())),
        ("ServiceAccount", sa.metadata.name)
    );
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_replaces_kube_proxy_with_least_privilege() {
    let ds: DaemonSet = load("daemonset.yaml");
    let spec = ds.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let sa: ServiceAccount = load("serviceaccount.yaml");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );

    let agent = &pod.containers[0];
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        field.field_path, "spec.nodeName",
        "NODE_NAME from the downward API"
    );

    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "capabilities, not privileged");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(
        added.is_subset(&["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"].into()),
        "{added:?}"
    );
    assert!(added.contains("BPF") && added.contains("NET_ADMIN"));
    let text = std::fs::read_to_string(deploy().join("daemonset.yaml")).unwrap();
    for cap in &added {
        assert!(
            text.contains(&format!("# {cap}:")),
            "the manifest says why {cap} is there"
        );
    }

    let config: ConfigMap = load("configmap.yaml");
    let bind = &config.data.as_ref().unwrap()["DATAPLANE_METRICS_BIND_ADDRESS"];
    let port: i32 = bind.rsplit(':').next().unwrap().parse().unwrap();
    for (probe, path) in [
        (&agent.readiness_probe, "/readyz"),
        (&agent.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
        assert_eq!(
            get.host.as_deref(),
            Some(bind.rsplit_once(':').unwrap().0),
            "probes reach the bind address"
        );
    }
    assert!(agent.resources.as_ref().unwrap().requests.is_some());

    let volumes = pod.volumes.unwrap();
    for (path, mount) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/run/dataplane", "/run/dataplane"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
    ] {
        let v = volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == path))
            .unwrap();
        assert!(
            agent
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == v.name && m.mount_path == mount)
        );
    }
    let data = config.data.unwrap();
    assert!(data["DATAPLANE_STATUS_FILE"].starts_with("/run/dataplane/"));
    assert!(
        data["DATAPLANE_BPFFS"].starts_with("/sys/fs/bpf/"),
        "pins live on the mounted bpffs"
    );
    assert_eq!(
        data["DATAPLANE_SOCKET_CGROUP"], "/sys/fs/cgroup",
        "socket hooks on the mounted cgroup v2 root"
    );
}

#[test]
fn configmap_keys_are_read_by_the_agent() {
    let config: ConfigMap = load("configmap.yaml");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_dataplane-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for key in config.data.unwrap().keys().filter(|k| *k != "RUST_LOG") {
        assert!(
            help.contains(&format!("env: {key}=")),
            "the agent does not read {key}:\n{help}"
        );
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let k: serde_yaml::Value = load("kustomization.yaml");
    let listed: BTreeSet<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

/// Against a real kube-apiserver: `deploy/` is accepted as a whole (server-side dry run, every
/// object validated and admitted), and once applied the agent's ServiceAccount may list and watch
/// exactly the watched kinds, and nothing else: no get, no secrets, no write of any kind.
#[test]
fn a_real_api_server_accepts_deploy_and_grants_the_agent_exactly_list_and_watch() {
    let api = testenv::ApiServer::start();
    let dir = deploy().display().to_string();
    let dry = api.kubectl_ok(&["apply", "--dry-run=server", "-k", &dir]);
    for object in [
        "serviceaccount/dataplane-agent",
        "clusterrole.rbac.authorization.k8s.io/dataplane-agent",
        "clusterrolebinding.rbac.authorization.k8s.io/dataplane-agent",
        "configmap/dataplane-agent",
        "daemonset.apps/dataplane-agent",
    ] {
        assert!(
            dry.contains(&format!("{object} created (server dry run)")),
            "{object}: {dry}"
        );
    }
    api.kubectl_ok(&["apply", "-k", &dir]);

    let sa: ServiceAccount = load("serviceaccount.yaml");
    let who = format!(
        "system:serviceaccount:{}:{}",
        sa.metadata.namespace.unwrap(),
        sa.metadata.name.unwrap()
    );
    let can = |verb: &str, resource: &str| {
        let out = api.kubectl(&["auth", "can-i", verb, resource, "--as", &who]);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            answer == "yes" || answer == "no",
            "can-i {verb} {resource}: {answer:?}"
        );
        answer == "yes"
    };
    let watched = dataplane_agent::kube_source::watched_resources();
    for (group, plural) in &watched {
        let resource = if group.is_empty() {
            plural.clone()
        } else {
            format!("{plural}.{group}")
        };
        for verb in ["list", "watch"] {
            assert!(can(verb, &resource), "{who} may {verb} {resource}");
        }
        for verb in [
            "get",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        ] {
            assert!(!can(verb, &resource), "{who} may not {verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("watch", "secrets"),
        ("list", "configmaps"),
        ("create", "events"),
        ("list", "daemonsets.apps"),
        ("create", "pods/eviction"),
        ("impersonate", "users"),
    ] {
        assert!(!can(verb, resource), "{who} may not {verb} {resource}");
    }

    // And the whole list of resource rules is exactly the watched kinds with list and watch.
    let list = api.kubectl_ok(&["auth", "can-i", "--list", "--as", &who]);
    let mut granted = BTreeSet::new();
    for line in list.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Resources  Non-Resource URLs  Resource Names  Verbs: resource rows have `[]` URLs.
        if cols.len() >= 4 && cols[1] == "[]" {
            let verbs = cols[3..].join(" ");
            granted.insert((cols[0].to_owned(), verbs));
        }
    }
    let mut want = BTreeSet::new();
    for (group, plural) in &watched {
        let resource = if group.is_empty() {
            plural.clone()
        } else {
            format!("{plural}.{group}")
        };
        want.insert((resource, "[list watch]".to_owned()));
    }
    // What every authenticated identity may do (self reviews), granted by the server itself.
    granted.retain(|(r, _)| !r.starts_with("selfsubject"));
    assert_eq!(granted, want, "{list}");
}
