//! `cargo xtask image`: the agent's container image without a registry. The runtime base is made
//! from Debian's own packages (mmdebstrap, cached in `target/image`), the agent is the host's
//! release build, and `deploy/Dockerfile` assembles them (podman, buildah's chroot isolation: no
//! container runtime is needed to build).
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// The image's name.
pub const IMAGE: &str = "localhost/dataplane-agent:dev";
const BASE: &str = "localhost/dataplane-agent-base:bookworm";
const AGENT: &str = "localhost/dataplane-agent-binary:dev";
/// What the runtime base holds beyond apt's own: what `cleanup-kube-proxy` runs.
const BASE_PACKAGES: &str = "iptables,nftables";

fn podman(args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(args);
    cmd
}

fn image_exists(name: &str) -> bool {
    podman(&["image", "exists", name])
        .status()
        .is_ok_and(|s| s.success())
}

/// Imports `tar` as image `name`.
fn import(tar: &Path, name: &str) -> anyhow::Result<()> {
    run(podman(&["import", "--quiet"]).arg(tar).arg(name))
}

/// Builds the image and returns its name.
///
/// # Errors
/// mmdebstrap, the agent's build or podman failed.
pub fn build() -> anyhow::Result<&'static str> {
    let release = crate::build_programs()?;
    let dir = workspace_root().join("target/image");
    std::fs::create_dir_all(&dir)?;

    // The base: a bookworm rootfs from Debian's mirrors, made once.
    let base_tar = dir.join(format!("bookworm-{}.tar", BASE_PACKAGES.replace(',', "-")));
    if !base_tar.exists() {
        eprintln!("image: making the Debian bookworm base with mmdebstrap (about a minute)");
        let partial = dir.join("base.partial.tar");
        run(Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--variant=apt",
                &format!("--include={BASE_PACKAGES}"),
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "bookworm",
            ])
            .arg(&partial))?;
        std::fs::rename(&partial, &base_tar)?;
    }
    if !image_exists(BASE) {
        import(&base_tar, BASE)?;
    }

    // The agent as the Dockerfile's `build` stage would leave it: /src/target/release/.
    let agent_tar = dir.join("agent.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&agent_tar)
        .arg("-C")
        .arg(&release)
        .arg("--transform=s,^,src/target/release/,")
        .arg("dataplane-agent"))?;
    import(&agent_tar, AGENT)?;

    run(podman(&[
        "build",
        "--quiet",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        &format!("AGENT_FROM={AGENT}"),
        "--build-arg",
        &format!("RUNTIME={BASE}"),
        "-f",
        "deploy/Dockerfile",
        "-t",
        IMAGE,
        ".",
    ])
    .current_dir(workspace_root()))
    .context("podman build -f deploy/Dockerfile")?;
    eprintln!("image: built {IMAGE}");
    Ok(IMAGE)
}
