//! The kernel side: loads the eBPF object, attaches its programs to pod interfaces, to the node's
//! external interfaces and (socket hooks) to the node's cgroup, writes and reads its maps.
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use dataplane_common::{
    Backend, CtKey, CtValue, DropReason, NODE_FLAG_POLICY, NODE_FLAG_SOCKET_PODS, NodeConfig,
    PolicyCounters, PolicyEndpoints, PolicyEvent, PolicyIdentity, PolicyKey, PolicyValue,
    ServiceKey, ServiceValue, SourceRangeKey, SvcStats, map_names, prog_names,
};

/// The socket hooks, attached together to one cgroup.
const SOCK_PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::SENDMSG4,
    prog_names::RECVMSG4,
    prog_names::GETPEERNAME4,
];

/// `statfs` magic of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

use dataplane_core::maps::{Op, next_policy_epoch};
use dataplane_core::reconcile::MapWriter;

/// One program's link to one interface. A pinned link outlives the agent: the program keeps
/// running while the agent restarts, and the next agent swaps its own program in atomically.
enum AttachedLink {
    Owned(SchedClassifierLink),
    Fd(FdLink),
    Pinned { link: FdLink, path: PathBuf },
}

impl AttachedLink {
    /// Detaches for good (a pinned link is unpinned first).
    fn detach(self) {
        match self {
            AttachedLink::Owned(link) => {
                // Best effort: the interface may be gone already, which detached it.
                let _ = link.detach();
            }
            AttachedLink::Fd(link) => {
                let _ = link.detach();
            }
            AttachedLink::Pinned { link, path } => {
                let _ = std::fs::remove_file(path);
                let _ = link.detach();
            }
        }
    }
}

/// The programs attached to one interface.
struct Attachment {
    ifindex: u32,
    links: Vec<AttachedLink>,
}

/// How XDP runs on an external interface: in the driver where it supports XDP, in the kernel's
/// generic path otherwise (an existing pinned link keeps the mode it was created with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
    /// Replaced into an earlier agent's pinned link, in that link's mode.
    Kept,
}

/// The datapath's connection tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtTable {
    /// `CONNTRACK`: both directions of every translated connection but the replies of
    /// source-NATed ones (LRU).
    Conntrack,
    /// `SNAT`: the replies of source-NATed connections, their port claims (never evicted).
    Snat,
}

/// The loaded eBPF object and handles to its maps.
pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    snat: HashMap<MapData, CtKey, CtValue>,
    drops: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    clock: Array<MapData, u64>,
    node: Array<MapData, NodeConfig>,
    node_config: NodeConfig,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    policy_ids: LpmTrie<MapData, u32, PolicyIdentity>,
    policy_ep: HashMap<MapData, u32, PolicyEndpoints>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_stats: PerCpuArray<MapData, PolicyCounters>,
    policy_events: RingBuf<MapData>,
    attached: BTreeMap<String, Attachment>,
    /// The node's external interfaces (XDP and TC egress), apart from pod interfaces.
    external: BTreeMap<String, (Attachment, XdpAttachMode)>,
    /// The cgroup the socket hooks are attached to, and their links.
    cgroup: Option<(PathBuf, Vec<AttachedLink>)>,
    pin_dir: Option<PathBuf>,
}

/// The policy epoch a freshly loaded datapath starts at: a value conntrack entries pinned by an
/// earlier agent are unlikely to carry (they are judged again on their next packet otherwise).
fn first_policy_epoch() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() ^ (d.as_secs() as u32))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// An `ingress_ifindex` for [`Datapath::test_run_tc`] that makes a packet forwarded to a pod:
/// neither sent by the node's own stack (0) nor bounced back out of the interface it came in on.
pub const FORWARDED_IFINDEX: u32 = u32::MAX - 1;

/// One `BPF_PROG_TEST_RUN` of a TC program.
#[derive(Debug)]
pub struct TcRun {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub duration_ns: u64,
}

impl Datapath {
    /// Loads the embedded object and verifies both programs, with fresh maps and no pinning.
    ///
    /// # Errors
    /// The kernel refused a map or a program (the verifier log is in the error chain).
    pub fn load() -> anyhow::Result<Self> {
        Self::load_object(crate::ebpf::OBJECT, None)
    }

    /// Loads an eBPF object. With a pin directory (on a bpffs), conntrack is shared with earlier
    /// agents through `<dir>/CONNTRACK_V3` and `<dir>/SNAT_V1` (and its clock, `<dir>/CLOCK_V1`)
    /// and links are pinned as `<dir>/links/<iface>_ingress` and `_egress` (bpffs refuses dots in
    /// names), so a restart
    /// keeps every connection; the translation maps are always fresh (and swapped in with the
    /// programs once programmed), so no half-known state is ever adopted.
    ///
    /// # Errors
    /// As [`Datapath::load`], or the pin directory cannot be used.
    pub fn load_object(object: &[u8], pin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir.join("links"))
                .with_context(|| format!("creating {}", dir.display()))?;
            loader.map_pin_path(map_names::CONNTRACK, dir.join(map_names::CONNTRACK));
            loader.map_pin_path(map_names::SNAT, dir.join(map_names::SNAT));
            loader.map_pin_path(map_names::CLOCK, dir.join(map_names::CLOCK));
            loader.map_pin_path(map_names::SOCK_REVNAT, dir.join(map_names::SOCK_REVNAT));
        }
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        for name in [
            prog_names::FROM_POD,
            prog_names::TO_POD,
            prog_names::TO_EXTERNAL,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier refused program {name}"))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier refused program {name}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(prog_names::FROM_EXTERNAL)
            .ok_or_else(|| {
                anyhow!(
                    "program {} missing from the eBPF object",
                    prog_names::FROM_EXTERNAL
                )
            })?
            .try_into()?;
        xdp.load()
            .with_context(|| format!("verifier refused program {}", prog_names::FROM_EXTERNAL))?;
        let mut node: Array<MapData, NodeConfig> = take_map(&mut ebpf, map_names::NODE)?;
        let node_config = NodeConfig {
            netns_cookie: own_netns_cookie()?,
            policy_epoch: first_policy_epoch(),
            ..NodeConfig::default()
        };
        node.set(0, node_config, 0)
            .context("writing the node's netns cookie")?;
        let mut datapath = Self {
            services: take_map(&mut ebpf, map_names::SERVICES)?,
            backends: take_map(&mut ebpf, map_names::BACKENDS)?,
            conntrack: take_map(&mut ebpf, map_names::CONNTRACK)?,
            snat: take_map(&mut ebpf, map_names::SNAT)?,
            drops: take_map(&mut ebpf, map_names::DROPS)?,
            svc_stats: take_map(&mut ebpf, map_names::SVC_STATS)?,
            clock: take_map(&mut ebpf, map_names::CLOCK)?,
            source_ranges: take_map(&mut ebpf, map_names::SOURCE_RANGES)?,
            policy_ids: take_map(&mut ebpf, map_names::POLICY_IDS)?,
            policy_ep: take_map(&mut ebpf, map_names::POLICY_EP)?,
            policy: take_map(&mut ebpf, map_names::POLICY)?,
            policy_stats: take_map(&mut ebpf, map_names::POLICY_STATS)?,
            policy_events: take_map(&mut ebpf, map_names::POLICY_EVENTS)?,
            node,
            node_config,
            ebpf,
            attached: BTreeMap::new(),
            external: BTreeMap::new(),
            cgroup: None,
            pin_dir: pin_dir.map(Path::to_path_buf),
        };
        datapath.tick_clock()?;
        Ok(datapath)
    }

    /// Writes the current CLOCK_MONOTONIC time into the datapath's clock, which stamps conntrack
    /// entries. The agent does this several times a second.
    ///
    /// # Errors
    /// The map write failed.
    pub fn tick_clock(&mut self) -> anyhow::Result<()> {
        self.set_clock(monotonic_ns())
    }

    /// Sets the datapath's clock to `ns`.
    ///
    /// # Errors
    /// The map write failed.
    pub fn set_clock(&mut self, ns: u64) -> anyhow::Result<()> {
        self.clock
            .set(0, ns, 0)
            .context("writing the datapath clock")
    }

    /// The policy verdict events written since the last call, oldest first.
    pub fn policy_events(&mut self) -> Vec<PolicyEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.policy_events.next() {
            if item.len() >= std::mem::size_of::<PolicyEvent>() {
                // SAFETY: the datapath writes whole `PolicyEvent`s (plain old data); the read
                // is unaligned-safe.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PolicyEvent>()) });
            }
        }
        out
    }

    /// Runs a TC program once on `frame` (BPF_PROG_TEST_RUN) with the given `__sk_buff`
    /// `ingress_ifindex`: the verdict, the frame as the program left it, the kernel's duration.
    ///
    /// # Errors
    /// No such program, or the kernel refused the run.
    pub fn test_run_tc(
        &self,
        name: &str,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> anyhow::Result<TcRun> {
        use aya::TestRun as _;
        let mut ctx = [0u8; 192];
        // struct __sk_buff: ingress_ifindex at offset 36.
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .program(name)?
            .test_run(aya::TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(r.data_size_out as usize);
        Ok(TcRun {
            verdict: r.return_value,
            frame: out,
            duration_ns: u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// No program of that name.
    pub fn program(&self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches both programs to a pod's host-side interface (TCX ingress and egress). An interface
    /// that was re-created under the same name is re-attached. With a pin directory, a link pinned
    /// by an earlier agent gets this agent's program swapped in atomically (no moment without a
    /// program), and new links are pinned.
    ///
    /// # Errors
    /// The interface does not exist or the kernel refused the link.
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<bool> {
        if let Some(a) = self.attached.get(iface) {
            if a.ifindex == ifindex {
                return Ok(false);
            }
            self.detach(iface);
        }
        let mut links = Vec::new();
        for (name, attach_type, side) in [
            (prog_names::FROM_POD, TcAttachType::Ingress, "ingress"),
            (prog_names::TO_POD, TcAttachType::Egress, "egress"),
        ] {
            let pin = self
                .pin_dir
                .as_ref()
                .map(|d| d.join("links").join(format!("{iface}_{side}")));
            match self.attach_one(name, iface, attach_type, pin) {
                Ok(link) => links.push(link),
                Err(e) => {
                    for link in links {
                        link.detach();
                    }
                    return Err(e).with_context(|| format!("attaching {name} to {iface}"));
                }
            }
        }
        self.attached
            .insert(iface.to_owned(), Attachment { ifindex, links });
        Ok(true)
    }

    fn attach_one(
        &mut self,
        name: &str,
        iface: &str,
        attach_type: TcAttachType,
        pin: Option<PathBuf>,
    ) -> anyhow::Result<AttachedLink> {
        let prog = self.classifier(name)?;
        let Some(path) = pin else {
            let id = prog.attach(iface, attach_type)?;
            return Ok(AttachedLink::Owned(prog.take_link(id)?));
        };
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|old| Ok(prog.attach_to_link(old)?));
            if let Ok(id) = replaced {
                let link = FdLink::try_from(prog.take_link(id)?)?;
                return Ok(AttachedLink::Pinned { link, path });
            }
            // The link's interface is gone (a pod re-created under the same name): start afresh.
            let _ = std::fs::remove_file(&path);
        }
        let id = prog.attach(iface, attach_type)?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        let link = FdLink::from(link.pin(&path)?);
        Ok(AttachedLink::Pinned { link, path })
    }

    /// Detaches from an interface (and unpins). Links to an interface that vanished are already
    /// gone; errors are ignored for that reason.
    pub fn detach(&mut self, iface: &str) {
        if let Some(a) = self.attached.remove(iface) {
            for link in a.links {
                link.detach();
            }
        }
    }

    /// Attaches to one of the node's external interfaces: `from_external` as XDP (native where
    /// asked for and the driver has it, else generic) and `to_external` as TC egress. Both or neither: a failure detaches what was
    /// attached. Pinned as `<dir>/links/<iface>_xdp` and `_egress`, with an earlier agent's links
    /// getting this agent's programs swapped in.
    ///
    /// # Errors
    /// The interface does not exist or the kernel refused a link.
    pub fn attach_external(
        &mut self,
        iface: &str,
        ifindex: u32,
        native: bool,
    ) -> anyhow::Result<Option<XdpAttachMode>> {
        if let Some((a, _)) = self.external.get(iface) {
            if a.ifindex == ifindex {
                return Ok(None);
            }
            self.detach_external(iface);
        }
        let pin = |side: &str| {
            self.pin_dir
                .as_ref()
                .map(|d| d.join("links").join(format!("{iface}_{side}")))
        };
        let (xdp_pin, tc_pin) = (pin("xdp"), pin("egress"));
        let (xdp, mode) = self
            .attach_xdp(iface, xdp_pin, native)
            .with_context(|| format!("attaching {} to {iface}", prog_names::FROM_EXTERNAL))?;
        let tc = match self.attach_one(prog_names::TO_EXTERNAL, iface, TcAttachType::Egress, tc_pin)
        {
            Ok(link) => link,
            Err(e) => {
                xdp.detach();
                return Err(e)
                    .with_context(|| format!("attaching {} to {iface}", prog_names::TO_EXTERNAL));
            }
        };
        let links = vec![xdp, tc];
        self.external
            .insert(iface.to_owned(), (Attachment { ifindex, links }, mode));
        Ok(Some(mode))
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        pin: Option<PathBuf>,
        native: bool,
    ) -> anyhow::Result<(AttachedLink, XdpAttachMode)> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::FROM_EXTERNAL)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::FROM_EXTERNAL))?
            .try_into()?;
        if let Some(path) = &pin
            && let Ok(pinned) = PinnedLink::from_pin(path)
        {
            let replaced = XdpLink::try_from(FdLink::from(pinned))
                .map_err(anyhow::Error::from)
                .and_then(|old| Ok(prog.attach_to_link(old)?));
            if let Ok(id) = replaced {
                let link = FdLink::try_from(prog.take_link(id)?)?;
                return Ok((
                    AttachedLink::Pinned {
                        link,
                        path: path.clone(),
                    },
                    XdpAttachMode::Kept,
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let native = if native {
            prog.attach(iface, XdpMode::Driver).ok()
        } else {
            None
        };
        let (id, mode) = match native {
            Some(id) => (id, XdpAttachMode::Native),
            None => (prog.attach(iface, XdpMode::Skb)?, XdpAttachMode::Generic),
        };
        let link = FdLink::try_from(prog.take_link(id)?)?;
        let Some(path) = pin else {
            return Ok((AttachedLink::Fd(link), mode));
        };
        let link = FdLink::from(link.pin(&path)?);
        Ok((AttachedLink::Pinned { link, path }, mode))
    }

    /// Detaches from an external interface (and unpins).
    pub fn detach_external(&mut self, iface: &str) {
        if let Some((a, _)) = self.external.remove(iface) {
            for link in a.links {
                link.detach();
            }
        }
    }

    /// External interfaces with their XDP mode.
    pub fn external(&self) -> impl Iterator<Item = (&str, XdpAttachMode)> {
        self.external.iter().map(|(i, (_, m))| (i.as_str(), *m))
    }

    /// Sets the node's source-NAT address and port range (host byte order, inclusive).
    ///
    /// # Errors
    /// The map write failed.
    pub fn set_snat(
        &mut self,
        addr: std::net::Ipv4Addr,
        ports: (u16, u16),
    ) -> anyhow::Result<bool> {
        let config = NodeConfig {
            snat_addr: u32::from_ne_bytes(addr.octets()),
            snat_port_min: ports.0,
            snat_port_max: ports.1,
            ..self.node_config
        };
        if config == self.node_config {
            return Ok(false);
        }
        self.node
            .set(0, config, 0)
            .context("writing the node's SNAT settings")?;
        self.node_config = config;
        Ok(true)
    }

    /// Lets the socket hooks translate the sockets of the node's pods too
    /// (`NODE_FLAG_SOCKET_PODS`), or only the node's own.
    ///
    /// # Errors
    /// The map write failed.
    pub fn set_socket_pods(&mut self, on: bool) -> anyhow::Result<()> {
        let flags = if on {
            self.node_config.flags | NODE_FLAG_SOCKET_PODS
        } else {
            self.node_config.flags & !NODE_FLAG_SOCKET_PODS
        };
        let config = NodeConfig {
            flags,
            ..self.node_config
        };
        self.node
            .set(0, config, 0)
            .context("writing the node's socket translation flags")?;
        self.node_config = config;
        Ok(())
    }

    /// Whether the socket hooks translate the node's pods' sockets.
    #[must_use]
    pub fn socket_pods(&self) -> bool {
        self.node_config.flags & NODE_FLAG_SOCKET_PODS != 0
    }

    /// Unpins links an earlier agent left for interfaces this one does not attach to.
    pub fn unpin_stale(&self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let iface = name
                .strip_suffix("_ingress")
                .or_else(|| name.strip_suffix("_egress"))
                .or_else(|| name.strip_suffix("_xdp"))
                .unwrap_or(&name);
            let ours = self.attached.contains_key(iface) || self.external.contains_key(iface);
            if !ours && std::fs::remove_file(entry.path()).is_ok() {
                removed.push(name);
            }
        }
        removed
    }

    /// Attaches the socket hooks (connect4, sendmsg4, recvmsg4, getpeername4) to a cgroup v2
    /// directory: every process in it or below it, in this node's network namespace, reaches
    /// Service frontends at the socket. All four or none: a failure detaches what was attached.
    /// With a pin directory the links are pinned as `<dir>/cgroup/<program>`; a link an earlier
    /// agent pinned keeps running until this agent's is in (both may run for that moment: the
    /// second sees a backend, not a frontend, and leaves it), then it is unpinned and goes.
    ///
    /// # Errors
    /// The path is not a cgroup v2 directory, or the kernel refused a link.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<bool> {
        if self.cgroup.is_some() {
            return Ok(false);
        }
        check_cgroup2(cgroup)?;
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let pins = self.pin_dir.as_ref().map(|d| d.join("cgroup"));
        if let Some(p) = &pins {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        let mut links = Vec::new();
        for name in SOCK_PROGRAMS {
            let pin = pins.as_ref().map(|d| d.join(name));
            match self.attach_sock(name, &dir, pin) {
                Ok(link) => links.push(link),
                Err(e) => {
                    for link in links {
                        link.detach();
                    }
                    return Err(e).with_context(|| {
                        format!("attaching {name} to cgroup {}", cgroup.display())
                    });
                }
            }
        }
        self.cgroup = Some((cgroup.to_path_buf(), links));
        Ok(true)
    }

    fn attach_sock(
        &mut self,
        name: &str,
        cgroup: &std::fs::File,
        pin: Option<PathBuf>,
    ) -> anyhow::Result<AttachedLink> {
        let prog: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        // A bpf_link on a cgroup takes no attach flags (the kernel refuses any): links always
        // coexist with other links and programs, which is what the handover below relies on.
        let id = prog.attach(cgroup, CgroupAttachMode::Single)?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        let Some(path) = pin else {
            return Ok(AttachedLink::Fd(link));
        };
        // Unpinning the earlier agent's link releases its last reference: it detaches now that
        // this one runs.
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
        let link = FdLink::from(link.pin(&path)?);
        Ok(AttachedLink::Pinned { link, path })
    }

    /// The cgroup the socket hooks are attached to.
    #[must_use]
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|(p, _)| p.as_path())
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// The loaded XDP program (for packet tests and benchmarks).
    ///
    /// # Errors
    /// The object has no such program.
    pub fn xdp_program(&self) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program(prog_names::FROM_EXTERNAL)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::FROM_EXTERNAL))?
            .try_into()?)
    }

    fn classifier(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Packets dropped by reason, summed over CPUs.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn drops(&self) -> anyhow::Result<Vec<(DropReason, u64)>> {
        DropReason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self.drops.get(&(*r as u32), 0)?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Packets, bytes and flows towards one service port, summed over CPUs.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn service_stats(&self, rev_nat_id: u16) -> anyhow::Result<SvcStats> {
        let per_cpu = self.svc_stats.get(&u32::from(rev_nat_id), 0)?;
        Ok(per_cpu.iter().fold(SvcStats::default(), |acc, s| SvcStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            flows: acc.flows + s.flows,
        }))
    }

    /// New flows admitted and denied for one policy endpoint and direction
    /// (`POLICY_DIR_*`), summed over CPUs.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn policy_counters(&self, endpoint: u16, dir: u8) -> anyhow::Result<PolicyCounters> {
        let slot = u32::from(endpoint) * 2 + u32::from(dir);
        let per_cpu = self.policy_stats.get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(PolicyCounters::default(), |acc, c| PolicyCounters {
                allowed: acc.allowed + c.allowed,
                denied: acc.denied + c.denied,
            }))
    }

    /// Service map entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn service_entries(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }

    /// Backend map entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn backend_entries(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        Ok(self.backends.iter().collect::<Result<_, _>>()?)
    }

    /// Conntrack entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn conntrack_entries(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// The reply entries of source-NATed connections (their port claims), as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn snat_entries(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        Ok(self.snat.iter().collect::<Result<_, _>>()?)
    }

    /// Removes one entry of a connection table (garbage collection).
    ///
    /// # Errors
    /// The entry could not be removed for another reason than being gone already.
    pub fn remove_tracked(&mut self, table: CtTable, key: &CtKey) -> anyhow::Result<()> {
        let map = match table {
            CtTable::Conntrack => &mut self.conntrack,
            CtTable::Snat => &mut self.snat,
        };
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl MapWriter for Datapath {
    fn write(&mut self, op: &Op) -> anyhow::Result<()> {
        match op {
            Op::UpsertBackend(id, b) => self.backends.insert(id, b, 0)?,
            Op::UpsertService(k, v) => self.services.insert(k, v, 0)?,
            Op::DeleteService(k) => match self.services.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
            Op::DeleteBackend(id) => match self.backends.remove(id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
            Op::UpsertSourceRange(r) => {
                self.source_ranges
                    .insert(&Key::new(r.prefix_len, r.key), 1, 0)?;
            }
            Op::DeleteSourceRange(r) => {
                match self.source_ranges.remove(&Key::new(r.prefix_len, r.key)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Op::UpsertPolicyRule(r, v) => {
                self.policy.insert(&Key::new(r.prefix_len, r.key), v, 0)?;
            }
            Op::DeletePolicyRule(r) => match self.policy.remove(&Key::new(r.prefix_len, r.key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
            Op::UpsertPolicyEndpoint(addr, ep) => self.policy_ep.insert(addr, ep, 0)?,
            Op::DeletePolicyEndpoint(addr) => match self.policy_ep.remove(addr) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
            Op::UpsertPolicyId(p, id) => {
                self.policy_ids
                    .insert(&Key::new(u32::from(p.len), p.addr), id, 0)?;
            }
            Op::DeletePolicyId(p) => {
                match self.policy_ids.remove(&Key::new(u32::from(p.len), p.addr)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Op::PolicyCommit {
                enforced,
                generation,
            } => {
                let flags = if *enforced {
                    self.node_config.flags | NODE_FLAG_POLICY
                } else {
                    self.node_config.flags & !NODE_FLAG_POLICY
                };
                let config = NodeConfig {
                    flags,
                    policy_epoch: next_policy_epoch(self.node_config.policy_epoch, *generation),
                    ..self.node_config
                };
                self.node
                    .set(0, config, 0)
                    .context("writing the node's policy epoch")?;
                self.node_config = config;
            }
        }
        Ok(())
    }
}

/// Fails unless `path` is a directory of a cgroup v2 filesystem.
fn check_cgroup2(path: &Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: an all-zero statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cgroup {}", path.display()));
    }
    if st.f_type != CGROUP2_SUPER_MAGIC {
        anyhow::bail!("{} is not a cgroup v2 directory", path.display());
    }
    Ok(())
}

/// The netns cookie of this process's network namespace (`SO_NETNS_COOKIE`).
fn own_netns_cookie() -> anyhow::Result<u64> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SO_NETNS_COOKIE");
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid descriptor, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt SO_NETNS_COOKIE");
    }
    Ok(cookie)
}

/// CLOCK_MONOTONIC in ns: the time base of the datapath's clock and of conntrack timestamps.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
