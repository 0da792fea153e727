//! The agent's hot paths at 10,000 Services (10 endpoints each): translating one Service,
//! a full translation of all of them, the diff of one Service's map entries after an endpoint
//! change, and building the backend-selection table (slots) of every Service into map state;
//! and compiling 1,000 NetworkPolicies over 10,000 pods for one node.
use bench::cluster;
use criterion::{Criterion, criterion_group, criterion_main};
use dataplane_core::maps::{MapState, diff};
use dataplane_core::object::{Kind, Object};
use dataplane_core::reconcile::Reconciler;
use dataplane_core::translate::translate_service;

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

fn policy_benches(c: &mut Criterion) {
    let (pods, policies) = bench::policy::cluster();
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
