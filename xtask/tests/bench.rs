//! `cargo xtask bench --quick` end to end: every step runs (datapath, control plane, the lab with
//! each mode) and the report holds a figure for each. Needs root, like the benchmark itself.
use std::process::Command;

use serde_json::Value;

#[test]
fn quick_bench_measures_every_mode_and_writes_the_report() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the benchmark needs root (eBPF, namespaces)"
    );
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("latest.json")).unwrap()).unwrap();
    assert!(
        results["machine"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );

    let paths = results["datapath"][0]["paths"].as_array().unwrap();
    for path in [
        "new flow",
        "established flow",
        "reply",
        "not a Service",
        "empty program",
        "NodePort new flow, local backend",
        "NodePort new flow, SNAT",
        "NodePort established, SNAT",
        "NodePort reply, SNAT",
        "external, not a frontend",
        "empty XDP program",
    ] {
        let p = paths.iter().find(|p| p["path"] == path).unwrap();
        assert!(p["median_ns"].as_f64().unwrap() > 0.0, "{path}");
    }

    let lab = results["lab"].as_array().unwrap();
    for mode in [
        "ours socket",
        "ours tc",
        "direct",
        "nftables",
        "iptables-nft",
        "iptables-legacy",
    ] {
        let row = lab.iter().find(|r| r["mode"] == mode).unwrap();
        for key in [
            "p50_us",
            "p99_us",
            "pod_ip_p50_us",
            "rps",
            "rps_pod_ip",
            "gbps",
        ] {
            assert!(
                row[key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}: {key} in {row}"
            );
        }
        for key in ["service_p50_us", "direct_p50_us"] {
            assert!(
                row["node"][key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}: node client {key} in {row}"
            );
        }
        assert!(row["node"]["overhead_p50_us"].as_f64().is_some(), "{row}");
        for key in ["service_p50_us", "direct_p50_us"] {
            assert!(
                row["external"][key].as_f64().is_some_and(|v| v > 0.0),
                "{mode}: external client to the NodePort, {key} in {row}"
            );
        }
        for key in ["overhead_p50_us", "overhead_iqr_us"] {
            assert!(row[key].as_f64().is_some(), "{mode}: paired {key} in {row}");
        }
    }

    let control = results["control"].as_array().unwrap();
    for mode in ["ours", "iptables-legacy", "iptables-nft", "nftables"] {
        let row = control.iter().find(|r| r["mode"] == mode).unwrap();
        assert!(row["full_sync_s"].as_f64().is_some(), "{mode}: {row}");
        assert!(row["change"]["p50_ms"].as_f64().is_some(), "{mode}: {row}");
    }
    assert!(results["agent_rss"][0]["peak_rss_mb"].as_f64().unwrap() > 1.0);

    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    for section in [
        "## Datapath",
        "## Through the real kernel",
        "From outside the cluster (the lab's external host) to a NodePort",
        "## Control plane",
        "## IPVS",
    ] {
        assert!(md.contains(section), "{section} missing");
    }
    for plot in ["datapath.svg", "latency.svg", "sync.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<circle"), "{plot}");
    }
}
