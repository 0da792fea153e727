//! cgroup v2 directories the lab creates (and only those): a subtree per lab run, one cgroup per
//! node below it, where the node's processes run and its agent's socket hooks attach. Nothing here
//! touches a cgroup it did not create; the machine's root cgroup is never a target.
//!
//! The lab reaches the hierarchy through a cgroup2 mount of its own below `/run/<lab>`: `ip netns
//! exec` remounts `/sys` for the programs it starts, which hides `/sys/fs/cgroup` from a node's
//! agent, while `/run` stays visible.
use std::ffi::CString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
///
/// # Errors
/// No cgroup2 mount.
pub fn mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .context("no cgroup v2 filesystem is mounted")
}

/// Mounts the cgroup v2 hierarchy at `dir` (made if missing).
///
/// # Errors
/// The directory cannot be made or the mount failed.
pub fn mount_at(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::netns::exec(
        Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2"])
            .arg(dir),
        &format!("mount -t cgroup2 cgroup2 {}", dir.display()),
    )
    .map(drop)
}

/// Creates `name` (relative, one or more levels) below `root`, a cgroup2 mount; its path.
///
/// # Errors
/// `name` is empty or absolute, or the directory cannot be made.
pub fn create(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty() || Path::new(name).is_absolute() || name.contains("..") {
        bail!("{name:?} is not a cgroup name below the lab's own");
    }
    let path = root.join(name);
    std::fs::create_dir_all(&path)
        .with_context(|| format!("creating cgroup {}", path.display()))?;
    Ok(path)
}

/// Moves the calling process (all its threads) into `cgroup`.
///
/// # Errors
/// The cgroup does not exist or refused the process.
pub fn join(cgroup: &Path) -> anyhow::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", cgroup.display()))
}

/// Makes `cmd` start its process inside `cgroup` (before it runs anything).
///
/// # Errors
/// The path cannot be passed to the kernel.
pub fn spawn_into(cmd: &mut Command, cgroup: &Path) -> anyhow::Result<()> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    // SAFETY: between fork and exec only async-signal-safe calls run (open, getpid, write,
    // close), on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut digits = [0u8; 12];
            let mut pid = libc::getpid() as u32;
            let mut at = digits.len();
            loop {
                at -= 1;
                digits[at] = b'0' + (pid % 10) as u8;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let n = digits.len() - at;
            let written = libc::write(fd, digits[at..].as_ptr().cast(), n);
            libc::close(fd);
            if written != n as isize {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Kills every process in `cgroup` and below, then removes the directories, deepest first. A
/// cgroup that is already gone is fine.
///
/// # Errors
/// A directory could not be removed.
pub fn remove(cgroup: &Path) -> anyhow::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    collect(cgroup, &mut dirs);
    for dir in &dirs {
        for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain syscall on a process of a cgroup the lab made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&dir) {
            if std::time::Instant::now() > deadline {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&entry.path(), out);
        }
    }
}

/// A cgroup that lives as long as this value (tests): created, removed with its processes on drop.
#[derive(Debug)]
pub struct Cgroup(PathBuf);

impl Cgroup {
    /// Creates `name` below the cgroup2 mount, replacing one a crashed run left.
    ///
    /// # Errors
    /// As [`create`] and [`remove`].
    pub fn create(name: &str) -> anyhow::Result<Cgroup> {
        let root = mount()?;
        remove(&root.join(name))?;
        Ok(Cgroup(create(&root, name)?))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = remove(&self.0);
    }
}
