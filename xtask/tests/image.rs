//! The agent's container image works: `cargo xtask image` builds it from Debian's packages and
//! `deploy/Dockerfile`, and the agent inside, run by podman in a lab node's network namespace,
//! loads and attaches its programs: with the lab's own agents stopped and their programs
//! detached, a pod reaches a ClusterIP only once the container's agent has programmed the node.
//! Needs root, podman and runc (the README's commands install them).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const LAB: &str = "kplimgtest";
const CONTAINER: &str = "kplimgtest-agent";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kplab(args: &[&str]) -> Output {
    Command::new(workspace().join("target/release/kplab"))
        .args(args)
        .env("KPLAB_NAME", LAB)
        .output()
        .expect("run kplab")
}

/// The web Service from the demo's client on node-a, `count` times.
fn probe_web(count: u32) -> Vec<Value> {
    ok(
        "probe",
        kplab(&[
            "probe",
            "--from",
            "demo/client-a",
            "--to",
            "10.96.200.10:80",
            "--timeout-ms",
            "500",
            "--count",
            &count.to_string(),
        ]),
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

/// Removes the container and the lab, also when the test fails.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", CONTAINER])
            .output();
        let _ = kplab(&["down"]);
    }
}

#[test]
fn the_agent_image_loads_and_attaches_its_programs_in_a_lab_node() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root (podman, eBPF, namespaces)"
    );
    ok(
        "xtask image",
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("image")
            .output()
            .unwrap(),
    );
    let _cleanup = Cleanup;
    let demo = workspace().join("examples/demo");
    ok(
        "lab up",
        kplab(&["up", "--manifests", demo.to_str().unwrap()]),
    );
    ok(
        "agents stop --detach",
        kplab(&["agents", "stop", "--detach"]),
    );
    // The kernel releases an unpinned link after an RCU grace period: wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe_web(1)[0]["result"] == "connected" {
        assert!(
            Instant::now() < deadline,
            "the lab's programs still translate 5 s after detach"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let state: Value = serde_json::from_str(&ok("status", kplab(&["status"]))).unwrap();
    let node = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["spec"]["name"] == "node-a")
        .expect("node-a");
    let netns = node["netns"].as_str().unwrap();
    let home = PathBuf::from("/run").join(LAB);
    let status = home.join("image-agent.json");
    let mount = format!("{0}:{0}", home.display());
    ok(
        "podman run",
        Command::new("podman")
            .args([
                // crun cannot start containers on hybrid cgroups; runc can. Limits are lowered
                // because this sandbox cannot raise them (no CAP_SYS_RESOURCE).
                "--runtime",
                "runc",
                "run",
                "-d",
                "--name",
                CONTAINER,
                "--privileged",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=4096:4096",
                "--network",
                &format!("ns:/run/netns/{netns}"),
                "-v",
                &mount,
                "localhost/dataplane-agent:dev",
                "run",
                "--node-name",
                "node-a",
                "--manifests",
                &home.join("manifests").display().to_string(),
                "--status-file",
                &status.display().to_string(),
            ])
            .output()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let attached = loop {
        let s: Option<Value> = std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let n = s
            .as_ref()
            .and_then(|s| s["interfaces"].as_array())
            .map_or(0, Vec::len);
        if n > 0 && s.as_ref().is_some_and(|s| s["fingerprint"].is_string()) {
            break n;
        }
        if Instant::now() > deadline {
            let logs = Command::new("podman")
                .args(["logs", CONTAINER])
                .output()
                .unwrap();
            panic!(
                "the container's agent did not program node-a within 60 s:\n{}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let pods_on_a = state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["node"] == "node-a")
        .count();
    assert_eq!(attached, pods_on_a, "one attachment per pod of node-a");
    let after = probe_web(20);
    assert!(
        after.iter().all(|r| r["result"] == "connected"),
        "{after:?}"
    );
    assert!(
        after.iter().all(|r| r["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("demo/web-"))),
        "{after:?}"
    );
}
