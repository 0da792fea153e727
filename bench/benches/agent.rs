//! The agent's hot paths at 10,000 Services (10 endpoints each): translating one Service,
//! a full translation of all of them, the diff of one Service's map entries after an endpoint
//! change, and building the backend-selection table (slots) of every Service into map state;
//! and compiling 1,000 NetworkPolicies over 10,000 pods for one node.
use bench::cluster;
use criterion::{Criterion, criterion_group, criterion_main};
use dataplane_core::maps::{MapState, diff};
use dataplane_core::object::{Kind, NsName, Object};
use dataplane_core::reconcile::Reconciler;
use dataplane_core::translate::translate_service;
use serde_json::json;

const N: usize = 10_000;

fn benches(c: &mut Criterion) {
    let objects = cluster::objects(N, 10, &[]);
    let index = cluster::index(&objects);
    let mid = index.services.keys().nth(N / 2).unwrap().clone();
    let svc = &index.services[&mid];
    let slices = index.slices_of(&mid);
    c.bench_function("translate one Service (10 endpoints)", |b| {
        b.iter(|| translate_service(std::hint::black_box(svc), &slices).unwrap());
    });
    c.bench_function("translate all 10k Services", |b| {
        b.iter(|| cluster::translated(&objects, &index).len());
    });

    // Every Service's slots written into map state: the backend-selection tables.
    let mut full = MapState::default();
    let mut programmer = Reconciler::default();
    c.bench_function("program all 10k Services into map state", |b| {
        b.iter(|| {
            full = MapState::default();
            programmer = Reconciler::default();
            for name in index.services.keys() {
                programmer.sync_service(&index, name, &mut full);
            }
        });
    });

    // One endpoint added to the middle Service: re-sync it against the full state.
    let mut changed = index.clone();
    let eps: Vec<_> = (0..11)
        .map(|j| cluster::filler_endpoint(N / 2, j))
        .collect();
    let slice = cluster::slice(&mid.name, 8080, &eps);
    let _ = changed.apply(Object::parse(Kind::EndpointSlice, slice).unwrap());
    c.bench_function("sync one Service after an endpoint change", |b| {
        b.iter_batched(
            || (programmer.clone(), full.clone()),
            |(mut p, mut state)| p.sync_service(&changed, &mid, &mut state).ops,
            criterion::BatchSize::LargeInput,
        );
    });

    let mut after = full.clone();
    programmer.clone().sync_service(&changed, &mid, &mut after);
    c.bench_function(
        "diff of 10k Services' map state, one endpoint changed",
        |b| {
            b.iter(|| diff(&full, &after).len());
        },
    );
}

/// 10,000 pods in 100 namespaces (50 app labels, an `http` port), a tenth of them on node n1, and
/// 1,000 policies: each selects one app, admits another app and an ipBlock with an except on
/// `http` and a port range, and lets it reach a third app in any namespace on `http`.
fn policy_cluster() -> (
    std::collections::BTreeMap<NsName, k8s_openapi::api::core::v1::Pod>,
    std::collections::BTreeMap<NsName, k8s_openapi::api::networking::v1::NetworkPolicy>,
) {
    let id = |ns: String, name: String| NsName {
        namespace: ns,
        name,
    };
    let pods = (0..10_000u32)
        .map(|n| {
            let pod = json!({
                "metadata": {"namespace": format!("ns{}", n % 100), "name": format!("p{n}"),
                             "labels": {"app": format!("a{}", n % 50)}},
                "spec": {"nodeName": if n % 10 == 0 { "n1" } else { "n2" },
                         "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": std::net::Ipv4Addr::from(0x0af4_0000 + n).to_string(), "phase": "Running"},
            });
            (
                id(format!("ns{}", n % 100), format!("p{n}")),
                serde_json::from_value(pod).unwrap(),
            )
        })
        .collect();
    let policies = (0..1_000u32)
        .map(|n| {
            let np = json!({
                "metadata": {"namespace": format!("ns{}", n % 100), "name": format!("np{n}")},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("a{}", n % 50)}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (n + 1) % 50)}}},
                                          {"ipBlock": {"cidr": format!("172.{}.0.0/16", n % 200), "except": [format!("172.{}.1.0/24", n % 200)]}}],
                                 "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}]}],
                    "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("a{}", (n + 2) % 50)}}}],
                                "ports": [{"port": "http"}]}],
                },
            });
            (
                id(format!("ns{}", n % 100), format!("np{n}")),
                serde_json::from_value(np).unwrap(),
            )
        })
        .collect();
    (pods, policies)
}

fn policy_benches(c: &mut Criterion) {
    let (pods, policies) = policy_cluster();
    let namespaces = std::collections::BTreeMap::new();
    c.bench_function(
        "compile 1k NetworkPolicies over 10k pods (1k on the node)",
        |b| {
            b.iter(|| {
                dataplane_core::policy::compile("n1", &pods, &namespaces, &policies)
                    .endpoints
                    .len()
            });
        },
    );
}

criterion_group! {
    name = agent;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = benches, policy_benches
}
criterion_main!(agent);
