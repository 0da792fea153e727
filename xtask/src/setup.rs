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

    let has_rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        });
    if !has_rust_src {
        eprintln!("setup: installing the nightly toolchain's rust-src (for -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
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
