//! The datapath's cost per packet, reported by the kernel (BPF_PROG_TEST_RUN's `duration`), for
//! each program and path, against an empty program of the same hook (`r0 = TC_ACT_OK; exit` for
//! TC, `r0 = XDP_PASS; exit` for XDP, loaded from two raw instructions) as the floor.
//!
//! Every run is one packet (`repeat = 1`): the kernel runs a repeated test on the same buffer, so
//! after the first pass the packet is already translated and later passes would measure another
//! path. Many single runs with fresh input, and the median of what the kernel reports, measure the
//! path named; the empty program is measured the same way.
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use dataplane_agent::datapath::Datapath;
use dataplane_common::prog_names;
use dataplane_core::fixtures::packet::{ACK, Pkt, SYN};
use dataplane_core::reconcile::{Reconciler, SyncProblem};

use crate::cluster;

/// An empty program (TC or XDP), loaded from raw instructions.
pub struct Empty {
    fd: OwnedFd,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    pad: [u64; 12],
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_PASS: u64 = 2;

impl Empty {
    /// Loads `r0 = 0 (TC_ACT_OK); exit`.
    ///
    /// # Errors
    /// The kernel refused the program (no CAP_BPF).
    pub fn load() -> anyhow::Result<Empty> {
        Self::load_as(BPF_PROG_TYPE_SCHED_CLS, 0)
    }

    /// Loads the XDP `r0 = XDP_PASS; exit`.
    ///
    /// # Errors
    /// As [`Empty::load`].
    pub fn load_xdp() -> anyhow::Result<Empty> {
        Self::load_as(BPF_PROG_TYPE_XDP, XDP_PASS)
    }

    fn load_as(prog_type: u32, r0: u64) -> anyhow::Result<Empty> {
        // mov64 r0, imm ; exit
        let insns: [u64; 2] = [0xb7 | (r0 << 32), 0x95];
        let license = c"GPL";
        let attr = ProgLoad {
            prog_type,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoad::default()
        };
        // SAFETY: attr points at valid memory for the call's duration.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const attr,
                size_of::<ProgLoad>(),
            )
        };
        if fd < 0 {
            bail!(
                "loading the empty program: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(Empty {
            fd: unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) },
        })
    }

    /// One run; the kernel's duration in ns.
    ///
    /// # Errors
    /// The test run failed.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<u64> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_fd().as_raw_fd())?,
            data_size_in: u32::try_from(frame.len())?,
            data_size_out: u32::try_from(out.len())?,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..TestRunAttr::default()
        };
        // SAFETY: the buffers outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>(),
            )
        };
        if r < 0 {
            bail!("test run: {}", std::io::Error::last_os_error());
        }
        Ok(u64::from(attr.duration))
    }
}

/// One of our programs on one frame; the kernel's duration in ns and the verdict.
fn run(dp: &Datapath, prog: &str, frame: &[u8]) -> anyhow::Result<(u64, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp.program(prog)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    Ok((
        u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
        r.return_value,
    ))
}

/// `runs` single-packet runs of the same frame.
fn repeated(runs: usize, mut one: impl FnMut() -> anyhow::Result<u64>) -> anyhow::Result<Vec<u64>> {
    (0..runs).map(|_| one()).collect()
}

/// One XDP run, as if the frame arrived on interface `ifindex`; the kernel's duration in ns, the
/// verdict and the output frame.
fn run_xdp(dp: &Datapath, ifindex: u32, frame: &[u8]) -> anyhow::Result<(u64, u32, Vec<u8>)> {
    // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&u32::try_from(frame.len())?.to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp.xdp_program()?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&md),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((
        u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
        r.return_value,
        out,
    ))
}

/// The NodePort paths of `from_external` (XDP), in a namespace of their own where the FIB
/// resolves (see [`routed_xdp_namespace`]), run on a thread that alone enters it.
fn external_paths(dp: &mut Datapath, runs: usize, paths: &mut Vec<PathCost>) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let (_ns, ifindex) = routed_xdp_namespace()?;
            external_paths_on(dp, ifindex, runs, paths)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the XDP measurement thread panicked"))?
    })
}

/// Creates a namespace (removed when the guard drops) and moves this thread into it: `ext0`
/// holds the node's address, the clients and the remote backend lie behind a gateway whose MAC
/// is known, so `from_external` sends source-NATed flows back out itself (XDP_TX), as on a
/// node. Nothing is sent anywhere: test runs only. Returns the guard and ext0's ifindex.
fn routed_xdp_namespace() -> anyhow::Result<(kplab::netns::Netns, u32)> {
    let ns = kplab::netns::Netns::create(format!("kplbench-xdp-{}", std::process::id()))?;
    kplab::netns::add_routed_uplink(ns.name(), "02:00:00:00:00:01")?;
    kplab::netns::enter(ns.name())?;
    // SAFETY: a NUL-terminated name; looked up in this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(c"ext0".as_ptr()) };
    if ifindex == 0 {
        bail!("ext0 is missing from {}", ns.name());
    }
    Ok((ns, ifindex))
}

/// A NodePort with a local backend (DNAT, to the kernel) and one with a remote backend (DNAT and
/// source NAT, sent back out), new and established, the source-NATed flow's replies, and
/// external traffic to no frontend; the scale's Services are in the maps.
fn external_paths_on(
    dp: &mut Datapath,
    ifindex: u32,
    runs: usize,
    paths: &mut Vec<PathCost>,
) -> anyhow::Result<()> {
    use std::collections::BTreeMap;

    use dataplane_core::maps::{MapState, backend_value, diff, service_entries};
    use dataplane_core::reconcile::MapWriter as _;
    use dataplane_core::translate::{BackendAddr, ExternalSpec, Frontend, FrontendSpec, Proto};

    const XDP_DROP: u32 = 1;
    const XDP_TX: u32 = 3;
    let node = Ipv4Addr::new(172, 31, 0, 2);
    dp.set_snat(node, (61000, 65535))?;
    let mut state = MapState::default();
    let mut ids = BTreeMap::new();
    for (port, addr, local) in [
        (30080, Ipv4Addr::new(10, 244, 1, 20), true),
        (30081, Ipv4Addr::new(10, 244, 2, 30), false),
    ] {
        let b = BackendAddr {
            addr,
            port: 8080,
            proto: Proto::Tcp,
            local,
        };
        let id = 200_000 + u32::from(port);
        ids.insert(b, id);
        state.backends.insert(id, backend_value(b));
        let spec = FrontendSpec {
            frontend: Frontend {
                addr: node,
                port,
                proto: Proto::Tcp,
            },
            backends: vec![b],
            drop_empty: false,
            external: Some(ExternalSpec {
                backends: vec![b],
                local: false,
            }),
            source_ranges: Vec::new(),
        };
        service_entries(&spec, 60_000 + port - 30_000, &ids, &mut state);
    }
    for op in diff(&MapState::default(), &state) {
        dp.write(&op)?;
    }
    // Every new source-NATed flow takes one of the backend's 4536 ports: at most half of them.
    let new_runs = runs.min(2000);
    for (path, port) in [
        ("NodePort new flow, local backend", 30080),
        ("NodePort new flow, SNAT", 30081),
    ] {
        let mut ns = Vec::with_capacity(new_runs);
        for i in 0..new_runs {
            let client = Ipv4Addr::from(0xc000_0200 + (i / 50_000) as u32);
            let f = Pkt::tcp(client, 10_000 + (i % 50_000) as u16, node, port, SYN).build();
            let (d, verdict, _) = run_xdp(dp, ifindex, &f)?;
            if verdict == XDP_DROP {
                let drops: Vec<_> = dp.drops()?.into_iter().filter(|(_, n)| *n > 0).collect();
                bail!("{path}: run {i} dropped ({drops:?})");
            }
            ns.push(d);
        }
        paths.push(summarise(path, prog_names::FROM_EXTERNAL, ns));
    }
    let client = Ipv4Addr::new(192, 0, 2, 99);
    let est = Pkt::tcp(client, 9_000, node, 30081, ACK).build();
    let (_, verdict, out) = run_xdp(dp, ifindex, &est)?;
    if out[26..30] == client.octets() || verdict != XDP_TX {
        bail!("established NodePort flow was not source-NATed and sent back out ({verdict})");
    }
    let ns = repeated(runs, || run_xdp(dp, ifindex, &est).map(|r| r.0))?;
    paths.push(summarise(
        "NodePort established, SNAT",
        prog_names::FROM_EXTERNAL,
        ns,
    ));
    let reply = Pkt::tcp(
        Ipv4Addr::new(10, 244, 2, 30),
        8080,
        node,
        u16::from_be_bytes([out[34], out[35]]),
        ACK,
    )
    .build();
    let (_, verdict, back) = run_xdp(dp, ifindex, &reply)?;
    if back[30..34] != client.octets() || verdict != XDP_TX {
        bail!("the source-NATed flow's reply did not go back to the client ({verdict})");
    }
    let ns = repeated(runs, || run_xdp(dp, ifindex, &reply).map(|r| r.0))?;
    paths.push(summarise(
        "NodePort reply, SNAT",
        prog_names::FROM_EXTERNAL,
        ns,
    ));
    let other = Pkt::tcp(client, 9_001, node, 22, ACK).build();
    let ns = repeated(runs, || run_xdp(dp, ifindex, &other).map(|r| r.0))?;
    paths.push(summarise(
        "external, not a frontend",
        prog_names::FROM_EXTERNAL,
        ns,
    ));
    let empty = Empty::load_xdp()?;
    let ns = repeated(runs, || empty.run(&est))?;
    paths.push(summarise("empty XDP program", "empty", ns));
    Ok(())
}

/// Kernel-reported ns per packet for each path at one scale: the median, and the mean after
/// dropping the slowest 1% (interrupts, migrations).
#[derive(Debug, serde::Serialize)]
pub struct PathCost {
    pub path: &'static str,
    pub program: &'static str,
    pub median_ns: f64,
    pub trimmed_mean_ns: f64,
    pub runs: usize,
}

pub fn summarise(path: &'static str, program: &'static str, mut ns: Vec<u64>) -> PathCost {
    ns.sort_unstable();
    let runs = ns.len();
    let median_ns = ns[runs / 2] as f64;
    let kept = &ns[..runs - runs / 100];
    let trimmed_mean_ns = kept.iter().sum::<u64>() as f64 / kept.len() as f64;
    PathCost {
        path,
        program,
        median_ns,
        trimmed_mean_ns,
        runs,
    }
}

/// Per-scale results.
#[derive(Debug, serde::Serialize)]
pub struct Scale {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub paths: Vec<PathCost>,
}

/// Measures every path with `n` Services of `endpoints` endpoints programmed, `runs` packets each.
///
/// # Errors
/// Loading, programming or a test run failed.
pub fn measure(n: usize, endpoints: usize, runs: usize) -> anyhow::Result<Scale> {
    let mut dp = Datapath::load().context("loading the eBPF object (needs root)")?;
    let objects = cluster::objects(n, endpoints, &[]);
    let index = cluster::index(&objects);
    let mut programmer = Reconciler::default();
    for svc in index.services.keys() {
        let report = programmer.sync_service(&index, svc, &mut dp);
        let write_failed = report
            .problems
            .iter()
            .find(|p| matches!(p, SyncProblem::MapWrite { .. }));
        if let Some(e) = write_failed {
            bail!("programming {n} Services: {e}");
        }
    }
    // The Service in the middle of the table.
    let target = n / 2;
    let vip = cluster::filler_vip(target);
    let client = Ipv4Addr::new(10, 244, 1, 10);
    let empty = Empty::load()?;
    let mut paths = Vec::new();

    // New flows: a new source port each time, so every packet misses conntrack and picks a backend.
    let frames: Vec<Vec<u8>> = (0..runs)
        .map(|i| Pkt::tcp(client, 10_000 + (i % 50_000) as u16, vip, 80, SYN).build())
        .collect();
    let mut ns = Vec::with_capacity(runs);
    for f in &frames {
        let (d, verdict) = run(&dp, prog_names::FROM_POD, f)?;
        if verdict != 0 {
            bail!("new flow: verdict {verdict}, expected TC_ACT_OK");
        }
        ns.push(d);
    }
    paths.push(summarise("new flow", prog_names::FROM_POD, ns));

    // Established: one flow, its conntrack entry made by the first packet.
    let est = Pkt::tcp(client, 9_000, vip, 80, ACK).build();
    let mut out = vec![0u8; est.len() + 256];
    let first = dp.program(prog_names::FROM_POD)?.test_run(TestRunOptions {
        data_in: Some(&est),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    out.truncate(first.data_size_out as usize);
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    if backend == vip {
        bail!("established flow was not translated");
    }
    let ns = repeated(runs, || run(&dp, prog_names::FROM_POD, &est).map(|r| r.0))?;
    paths.push(summarise("established flow", prog_names::FROM_POD, ns));

    // Replies of that flow, from the backend, reverse-translated on the way into the client pod.
    let reply = Pkt::tcp(backend, 8080, client, 9_000, ACK).build();
    let ns = repeated(runs, || run(&dp, prog_names::TO_POD, &reply).map(|r| r.0))?;
    paths.push(summarise("reply", prog_names::TO_POD, ns));

    // Traffic to a pod address, not a Service: what non-Service traffic pays.
    let pod = Pkt::tcp(client, 9_001, Ipv4Addr::new(10, 244, 2, 30), 8080, ACK).build();
    let ns = repeated(runs, || run(&dp, prog_names::FROM_POD, &pod).map(|r| r.0))?;
    paths.push(summarise("not a Service", prog_names::FROM_POD, ns));

    let ns = repeated(runs, || empty.run(&est))?;
    paths.push(summarise("empty program", "empty", ns));
    external_paths(&mut dp, runs, &mut paths)?;
    Ok(Scale {
        services: n,
        endpoints_per_service: endpoints,
        paths,
    })
}
