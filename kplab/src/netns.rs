//! Network namespaces: the one place that creates, enters, runs in, lists and deletes them.
//!
//! A lab's namespaces outlive the command that made them (`kplab up`, then `kplab probe`), so the
//! lab names them and removes them by prefix; a namespace that lives only as long as a value (a
//! test's, a benchmark's) is a [`Netns`] guard, deleted on drop.
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Runs a command to completion; its stderr is the error when it fails.
pub(crate) fn exec(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a namespace.
///
/// # Errors
/// `ip netns add` failed (for example, the name is taken).
pub fn add(name: &str) -> anyhow::Result<()> {
    exec(
        Command::new("ip").args(["netns", "add", name]),
        &format!("ip netns add {name}"),
    )
    .map(drop)
}

/// Deletes a namespace (its interfaces go with it).
///
/// # Errors
/// `ip netns del` failed.
pub fn delete(name: &str) -> anyhow::Result<()> {
    exec(
        Command::new("ip").args(["netns", "del", name]),
        &format!("ip netns del {name}"),
    )
    .map(drop)
}

/// A command that runs `program` inside namespace `name`.
#[must_use]
pub fn command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", name]).arg(program);
    c
}

/// Runs `program args` inside `name`; its stdout.
///
/// # Errors
/// It could not start or exited with an error (its stderr is the message).
pub fn run(name: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    exec(
        command(name, program).args(args).stdin(Stdio::null()),
        &format!("{program} {} in {name}", args.join(" ")),
    )
}

/// Moves the calling thread into namespace `name`.
///
/// # Errors
/// The namespace does not exist or setns failed.
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: `f` is an open namespace file descriptor for the duration of the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives namespace `name` (one the caller created) an uplink as a node has, for XDP test runs
/// (BPF_PROG_TEST_RUN on a frame "arriving" there): `ext0`, a veth with MAC 02:00:00:00:00:aa,
/// the address 172.31.0.2/24, forwarding on, and 10.244.2.0/24 and 192.0.2.0/24 routed through
/// 172.31.0.1, whose MAC is `gateway_mac`, so the FIB resolves next hops. Its peer `ext1` stays
/// in the namespace too: nothing leaves it.
///
/// # Errors
/// A command failed.
pub fn add_routed_uplink(name: &str, gateway_mac: &str) -> anyhow::Result<()> {
    let neigh = format!("neigh replace 172.31.0.1 lladdr {gateway_mac} dev ext0 nud permanent");
    for args in [
        "link add ext0 address 02:00:00:00:00:aa type veth peer name ext1",
        "link set ext1 up",
        "link set ext0 up",
        "addr add 172.31.0.2/24 dev ext0",
        "route add 10.244.2.0/24 via 172.31.0.1",
        "route add 192.0.2.0/24 via 172.31.0.1",
        &neigh,
    ] {
        run(name, "ip", &args.split(' ').collect::<Vec<_>>())?;
    }
    // The FIB helper answers only where the interface forwards (a node's uplink does).
    run(name, "sysctl", &["-qw", "net.ipv4.conf.ext0.forwarding=1"]).map(drop)
}

/// The processes running inside `name` (none if it cannot be read).
#[must_use]
pub fn pids(name: &str) -> Vec<u32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Every namespace whose name starts with `prefix`.
///
/// # Errors
/// `ip netns list` could not run.
pub fn list(prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// A namespace that lives as long as this value: created (replacing a stale one of the same name
/// a crashed run left), deleted on drop.
#[derive(Debug)]
pub struct Netns(String);

impl Netns {
    /// Creates namespace `name`, with loopback up.
    ///
    /// # Errors
    /// Not root, or `ip` failed.
    pub fn create(name: impl Into<String>) -> anyhow::Result<Netns> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            bail!("creating a network namespace needs root");
        }
        let name = name.into();
        if list(&name)?.contains(&name) {
            delete(&name)?;
        }
        add(&name)?;
        let ns = Netns(name);
        exec(
            Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]),
            "ip link set lo up",
        )?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.0
    }

    /// A command that runs `program` inside this namespace.
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command(&self.0, program)
    }

    /// Runs `program args` inside; its stdout.
    ///
    /// # Errors
    /// It could not start or exited with an error.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(&self.0, program, args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete(&self.0);
    }
}
