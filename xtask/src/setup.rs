//! Installs what a fresh machine lacks, saying what it installs: Debian packages, the nightly
//! toolchain's rust-src, and bpf-linker built against LLVM 22.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages the build, the lab, the tests and the demo use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (rustc nightly's LLVM major).
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    // The lab: namespaces, veths, routes; TX checksum offload off; nstat; a real HTTP client.
    "iproute2",
    "ethtool",
    "curl",
    // cleanup-kube-proxy and its test: both iptables backends and nft.
    "iptables",
    "nftables",
    // The real API server tests: kubectl, and openssl for their certificates.
    "kubectl",
    "openssl",
    // The agent's image without a registry: a Debian base, podman to build it, runc to run it
    // (crun cannot start containers on this machine kind's hybrid cgroups).
    "mmdebstrap",
    "podman",
    "runc",
    // The benchmark and the lab tests: real servers and clients in lab pods and nodes.
    "nginx",
    "wrk",
    "iperf3",
    "dnsmasq-base",
    "bind9-dnsutils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Makes sure everything is there; installs only what is missing.
///
/// # Errors
/// An install step failed.
pub fn ensure() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        if unsafe { libc::geteuid() } != 0 {
            bail!("missing packages {missing:?}; run as root so they can be installed");
        }
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
    }

    // rust-src for `-Z build-std=core`; clippy to lint the eBPF crate for its own target.
    let nightly = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let missing: Vec<&str> = ["rust-src", "clippy"]
        .into_iter()
        .filter(|c| {
            !nightly
                .as_deref()
                .is_some_and(|n| n.lines().any(|l| l.starts_with(c)))
        })
        .collect();
    if nightly.is_none() {
        eprintln!("setup: installing the nightly toolchain with rust-src and clippy");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
    } else if !missing.is_empty() {
        eprintln!(
            "setup: adding {} to the nightly toolchain",
            missing.join(" and ")
        );
        run(Command::new("rustup")
            .args(["component", "add", "--toolchain", "nightly"])
            .args(&missing))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]))
        .context("building bpf-linker")?;
    }
    Ok(())
}
