//! What the agent reports: the status (JSON, for the status file and the lab) and its Prometheus
//! text rendering (for `/metrics`).
use std::fmt::Write as _;

pub use dataplane_core::status::{Histogram, MapUsage, ServiceStatus, Status};

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One figure of a service's status.
type ServiceFigure = fn(&ServiceStatus) -> u64;

/// Renders the status in the Prometheus text exposition format.
#[must_use]
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "dataplane_ready",
        "gauge",
        "1 once the first full sync is programmed.",
    );
    let _ = writeln!(o, "dataplane_ready {}", u8::from(s.ready()));
    family(
        &mut o,
        "dataplane_programmed_generation",
        "counter",
        "Batches of changes fully programmed.",
    );
    let _ = writeln!(o, "dataplane_programmed_generation {}", s.generation);
    family(
        &mut o,
        "dataplane_objects",
        "gauge",
        "Objects known to the agent, by kind.",
    );
    for (kind, n) in &s.objects {
        let _ = writeln!(o, "dataplane_objects{{kind=\"{kind}\"}} {n}");
    }
    family(
        &mut o,
        "dataplane_map_entries",
        "gauge",
        "Entries in each BPF map.",
    );
    for (map, u) in &s.maps {
        let _ = writeln!(o, "dataplane_map_entries{{map=\"{map}\"}} {}", u.entries);
    }
    family(
        &mut o,
        "dataplane_map_capacity",
        "gauge",
        "Capacity (max entries) of each BPF map.",
    );
    for (map, u) in &s.maps {
        let _ = writeln!(o, "dataplane_map_capacity{{map=\"{map}\"}} {}", u.capacity);
    }
    family(
        &mut o,
        "dataplane_attached_interfaces",
        "gauge",
        "Pod interfaces with the programs attached.",
    );
    let _ = writeln!(o, "dataplane_attached_interfaces {}", s.interfaces.len());
    family(
        &mut o,
        "dataplane_sync_latency_seconds",
        "histogram",
        "Time from a change being received to its map writes being done.",
    );
    let mut cumulative = 0;
    for (bound, n) in s.sync_latency.bounds.iter().zip(&s.sync_latency.counts) {
        cumulative += n;
        let _ = writeln!(
            o,
            "dataplane_sync_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        o,
        "dataplane_sync_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        s.sync_latency.count
    );
    let _ = writeln!(
        o,
        "dataplane_sync_latency_seconds_sum {}",
        s.sync_latency.sum
    );
    let _ = writeln!(
        o,
        "dataplane_sync_latency_seconds_count {}",
        s.sync_latency.count
    );
    family(
        &mut o,
        "dataplane_drops_total",
        "counter",
        "Packets dropped or rejected by the datapath, by reason.",
    );
    for (reason, n) in &s.drops {
        let _ = writeln!(o, "dataplane_drops_total{{reason=\"{reason}\"}} {n}");
    }
    family(
        &mut o,
        "dataplane_errors_total",
        "counter",
        "Problems the agent met, by label.",
    );
    for (label, n) in &s.errors {
        let _ = writeln!(o, "dataplane_errors_total{{label=\"{label}\"}} {n}");
    }
    // Per-service counter families: name, help, the figure.
    let per_service: [(&str, &str, ServiceFigure); 2] = [
        (
            "dataplane_service_packets_total",
            "Packets the per-packet programs (TC, XDP) sent towards each service frontend (flows \
             translated at the socket send theirs straight to the backend and are not counted \
             here).",
            |svc| svc.packets,
        ),
        (
            "dataplane_service_flows_total",
            "Flows translated to a backend of each service frontend: connections and unconnected \
             sends at the socket hooks, new flows on the packet paths.",
            |svc| svc.flows,
        ),
    ];
    for (name, help, value) in per_service {
        family(&mut o, name, "counter", help);
        for svc in &s.services {
            let _ = writeln!(
                o,
                "{name}{{service=\"{}\",frontend=\"{}\"}} {}",
                esc(&svc.service),
                esc(&svc.frontend),
                value(svc)
            );
        }
    }
    family(
        &mut o,
        "dataplane_policy_flows_total",
        "counter",
        "New flows of each NetworkPolicy-enforced local pod, by direction and verdict (a pod's \
         policy that could not be written whole fails closed: every flow denied).",
    );
    for ep in &s.policy {
        for (direction, verdict, n) in [
            ("ingress", "allowed", ep.ingress_allowed),
            ("ingress", "denied", ep.ingress_denied),
            ("egress", "allowed", ep.egress_allowed),
            ("egress", "denied", ep.egress_denied),
        ] {
            let _ = writeln!(
                o,
                "dataplane_policy_flows_total{{pod=\"{}\",direction=\"{direction}\",verdict=\"{verdict}\"}} {n}",
                esc(&ep.pod)
            );
        }
    }
    family(
        &mut o,
        "dataplane_policy_endpoint_fail_closed",
        "gauge",
        "1 for an enforced local pod whose policy could not be written whole (denied until it is).",
    );
    for ep in &s.policy {
        let _ = writeln!(
            o,
            "dataplane_policy_endpoint_fail_closed{{pod=\"{}\"}} {}",
            esc(&ep.pod),
            u8::from(ep.fail_closed)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_render_cumulatively() {
        let mut s = Status::default();
        s.sync_latency.observe(0.000_05);
        s.sync_latency.observe(0.003);
        s.sync_latency.observe(7.0);
        let text = render(&s);
        assert!(text.contains("dataplane_sync_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("dataplane_sync_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("dataplane_sync_latency_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("dataplane_sync_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("dataplane_sync_latency_seconds_count 3\n"));
        assert!(text.contains("dataplane_ready 0\n"));
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let mut s = Status::default();
        s.objects.insert("Service".into(), 2);
        s.errors.insert("map_write".into(), 1);
        s.drops.insert("malformed".into(), 3);
        s.maps.insert(
            "SERVICES_V1".into(),
            MapUsage {
                entries: 5,
                capacity: 10,
            },
        );
        s.services.push(ServiceStatus {
            service: "ns/a\"b".into(),
            frontend: "10.96.0.1:80/TCP".into(),
            backends: vec![],
            packets: 4,
            bytes: 9,
            flows: 2,
        });
        let text = render(&s);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                families.iter().any(|f| name == *f
                    || name
                        .strip_prefix(f)
                        .is_some_and(|r| ["_bucket", "_sum", "_count"].contains(&r))),
                "{line}"
            );
        }
        assert!(text.contains("service=\"ns/a\\\"b\""));
        assert!(text.contains("dataplane_map_capacity{map=\"SERVICES_V1\"} 10"));
        assert!(text.contains(
            "dataplane_service_flows_total{service=\"ns/a\\\"b\",frontend=\"10.96.0.1:80/TCP\"} 2"
        ));
    }
}
