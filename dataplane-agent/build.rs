//! Builds the eBPF object (`dataplane-ebpf`) with the nightly toolchain, the aya-template way, and
//! leaves it in `OUT_DIR/dataplane` for `include_bytes_aligned!`.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("agent crate has no parent directory")?;
    let ebpf_dir = workspace.join("dataplane-ebpf");
    let common_dir = workspace.join("dataplane-common");
    println!("cargo::rerun-if-changed={}", common_dir.display());

    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // aya-build writes nothing when skipping; an empty object keeps `cargo check`/clippy fast.
        let out = PathBuf::from(env::var("OUT_DIR")?).join("dataplane");
        if !out.exists() {
            fs::write(&out, [])?;
        }
        println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "dataplane-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
