//! Service translation on each local pod's host-side interface.
//!
//! ```text
//!   pod eth0 ==veth== host side (lxc*)
//!                      |- TC ingress  `from_pod`: parse -> conntrack -> service lookup -> DNAT | reject
//!                      '- TC egress   `to_pod`:   parse -> conntrack (reply) -> reverse NAT (SNAT)
//! ```
//!
//! Every entry point only calls its `try_*` body; an `Err(DropReason)` becomes `TC_ACT_SHOT` plus a
//! per-CPU drop counter. Packets the datapath does not handle (non-IPv4, other L4 protocols, IP
//! fragments) pass untouched.
#![no_std]
#![no_main]

mod parse;
mod reject;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use dataplane_common::{
    Backend, CT_DIR_REPLY, CT_DIR_SERVICE, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CtKey, CtValue,
    DropReason, HAIRPIN_ADDR, MAX_BACKENDS, MAX_CONNTRACK, MAX_REV_NAT_IDS, MAX_SERVICE_ENTRIES,
    PROTO_UDP, SCOPE_CLUSTER, ServiceKey, ServiceValue, SvcStats,
};
use parse::{IPV4_OFF, Packet, TCP_FLAG_FIN, TCP_FLAG_RST, header_mut};

/// Service frontends: slot 0 is the header, slots 1..=count the backend ids. Written by the agent.
#[map(name = "SERVICES_V1")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend id -> address and port. Written by the agent.
#[map(name = "BACKENDS_V1")]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Translated connections, one entry per direction. Written by the datapath; swept by the agent.
#[map(name = "CONNTRACK_V1")]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// Packets dropped or rejected, by `DropReason`. Written by the datapath; read by the agent.
#[map(name = "DROPS_V1")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Packets and bytes towards each service port, by reverse-NAT id. Written by the datapath.
#[map(name = "SVC_STATS_V1")]
static SVC_STATS: PerCpuArray<SvcStats> = PerCpuArray::with_max_entries(MAX_REV_NAT_IDS, 0);

/// CLOCK_MONOTONIC in ns, written by the agent several times a second: conntrack timestamps need
/// no finer clock (refreshes are a second apart, idle lifetimes 10 s and up), and reading an array
/// slot is a few instructions where a clock helper is a call (costly with return-thunk mitigations).
#[map(name = "CLOCK_V1")]
static CLOCK: Array<u64> = Array::with_max_entries(1, 0);

/// A conntrack entry's last-seen time is refreshed at most this often, to keep per-packet map writes
/// rare.
const CT_REFRESH_NS: u64 = 1_000_000_000;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict(try_from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict(try_to_pod(&ctx))
}

#[inline(always)]
fn verdict(result: Result<i32, DropReason>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn count_service(rev_nat_id: u16, bytes: u32) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(u32::from(rev_nat_id)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(bytes);
        }
    }
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    if pkt.daddr == HAIRPIN_ADDR {
        return hairpin_reply(ctx, &pkt);
    }
    let key = pkt.ct_key(CT_DIR_SERVICE);
    if let Some(ct) = conntrack(key) {
        let reopened = pkt.is_tcp_syn() && ct.flags & CT_FLAG_CLOSING != 0;
        if !reopened {
            track(ct, &pkt);
            count_service(ct.rev_nat_id, ctx.len());
            nat_dst(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
            if ct.flags & CT_FLAG_HAIRPIN != 0 {
                return hairpin(ctx, &pkt, HAIRPIN_ADDR, pkt.sport);
            }
            return Ok(TC_ACT_OK);
        }
    }

    let mut svc_key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_CLUSTER,
        slot: 0,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(header) = (unsafe { SERVICES.get(svc_key) }).copied() else {
        forget_reused_tuple(&pkt);
        return Ok(TC_ACT_OK);
    };
    count_service(header.rev_nat_id, ctx.len());
    if header.count == 0 {
        count_drop(DropReason::NoBackend);
        return reject::reply(ctx, &pkt);
    }
    // SAFETY: helper call without arguments.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(header.count);
    svc_key.slot = (pick + 1) as u16;
    // SAFETY: the value is copied out at once.
    let slot = unsafe { SERVICES.get(svc_key) }.ok_or(DropReason::BackendMissing)?;
    let backend_id = slot.backend_id;
    // SAFETY: the value is copied out at once.
    let backend = *unsafe { BACKENDS.get(backend_id) }.ok_or(DropReason::BackendMissing)?;

    let now = now_ns();
    let is_hairpin = backend.addr == pkt.saddr;
    let (flags, client_addr) = if is_hairpin {
        (closing_flags(&pkt) | CT_FLAG_HAIRPIN, HAIRPIN_ADDR)
    } else {
        (closing_flags(&pkt), pkt.saddr)
    };
    let reply_key = CtKey {
        saddr: backend.addr,
        daddr: client_addr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        pad: 0,
    };
    let reply = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        flags,
        backend_id,
        rev_nat_id: header.rev_nat_id,
        pad: 0,
        last_seen_ns: now,
    };
    let forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        ..reply
    };
    // The reply entry goes in first, so the backend's first answer always finds it. Both inserts
    // overwrite: a reopened tuple (SYN after FIN/RST) replaces its stale entries.
    CONNTRACK
        .insert(reply_key, reply, 0)
        .map_err(|_| DropReason::CtCreateFailed)?;
    CONNTRACK
        .insert(key, forward, 0)
        .map_err(|_| DropReason::CtCreateFailed)?;
    nat_dst(ctx, &pkt, backend.addr, backend.port)?;
    if is_hairpin {
        return hairpin(ctx, &pkt, HAIRPIN_ADDR, pkt.sport);
    }
    Ok(TC_ACT_OK)
}

/// A pod opens a connection straight to an address that a Service connection of the same source
/// port was translated to (the kernel picks source ports per destination, so this happens). On the
/// wire both are the same tuple, so the backend's answers would match that connection's reply entry
/// and be rewritten to the Service address: the pod's newer connection wins, and the Service
/// connection's entries go. Checked on a TCP SYN, and on every UDP datagram (no handshake).
#[inline(always)]
fn forget_reused_tuple(pkt: &Packet) {
    if !(pkt.is_tcp_syn() || pkt.proto == PROTO_UDP) {
        return;
    }
    let reply_key = CtKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(reply) = (unsafe { CONNTRACK.get(reply_key) }).copied() else {
        return;
    };
    let forward_key = CtKey {
        daddr: reply.nat_addr,
        dport: reply.nat_port,
        ..pkt.ct_key(CT_DIR_SERVICE)
    };
    let _ = CONNTRACK.remove(reply_key);
    let _ = CONNTRACK.remove(forward_key);
}

/// The reply of a hairpinned connection, sent by the backend pod to [`HAIRPIN_ADDR`]: restore the
/// service address as its source and the pod itself as its destination.
#[inline(never)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    let Some(ct) = conntrack(pkt.ct_key(CT_DIR_REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    track(ct, pkt);
    // The destination becomes the pod itself (the client side of the hairpin).
    rewrite(
        ctx,
        pkt,
        IP_DADDR_OFF,
        pkt.daddr,
        pkt.saddr,
        pkt.l4_off + 2,
        pkt.dport,
        pkt.dport,
    )?;
    hairpin(ctx, pkt, ct.nat_addr, ct.nat_port)
}

/// Rewrites the source of a packet that goes back to the pod it came from, and sends it straight
/// back out of the same interface (no routing: the pod's interface is both ends).
fn hairpin(ctx: &TcContext, pkt: &Packet, saddr: u32, sport: u16) -> Result<i32, DropReason> {
    nat_src(ctx, pkt, saddr, sport)?;
    let eth: [u8; 12] = ctx.load(0).map_err(|_| DropReason::NatFailed)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..]);
    swapped[6..].copy_from_slice(&eth[..6]);
    ctx.store(0, &swapped, 0)
        .map_err(|_| DropReason::NatFailed)?;
    Ok(back_to_pod(ctx))
}

fn try_to_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let Some(ct) = conntrack(pkt.ct_key(CT_DIR_REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    track(ct, &pkt);
    nat_src(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
    Ok(TC_ACT_OK)
}

/// The conntrack entry of a tuple, to read and to refresh.
#[inline(always)]
fn conntrack(key: CtKey) -> Option<&'static mut CtValue> {
    let ct = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run; the
    // entry's flags and timestamp are only ever set (racing writers can at worst lose a refresh).
    Some(unsafe { &mut *ct })
}

/// Sends the packet back out of the interface it came in on, towards the pod.
#[inline(always)]
pub(crate) fn back_to_pod(ctx: &TcContext) -> i32 {
    // SAFETY: `skb` is the program's own context pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn closing_flags(pkt: &Packet) -> u16 {
    if pkt.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        CT_FLAG_CLOSING
    } else {
        0
    }
}

/// The agent's clock (see [`CLOCK`]).
#[inline(always)]
fn now_ns() -> u64 {
    CLOCK.get(0).copied().unwrap_or(0)
}

/// Marks the entry closing on FIN/RST and refreshes its timestamp, at most once a second.
#[inline(always)]
fn track(ct: &mut CtValue, pkt: &Packet) {
    let closing = closing_flags(pkt);
    if ct.flags & closing != closing {
        ct.flags |= closing;
    }
    let now = now_ns();
    if now.wrapping_sub(ct.last_seen_ns) > CT_REFRESH_NS {
        ct.last_seen_ns = now;
    }
}

const IP_SADDR_OFF: usize = IPV4_OFF + 12;
const IP_DADDR_OFF: usize = IPV4_OFF + 16;

/// Rewrites destination address and port, fixing the IPv4 and L4 checksums incrementally.
#[inline(always)]
fn nat_dst(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), DropReason> {
    rewrite(
        ctx,
        pkt,
        IP_DADDR_OFF,
        pkt.daddr,
        addr,
        pkt.l4_off + 2,
        pkt.dport,
        port,
    )
}

/// Rewrites source address and port, fixing the IPv4 and L4 checksums incrementally.
#[inline(always)]
fn nat_src(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), DropReason> {
    rewrite(
        ctx,
        pkt,
        IP_SADDR_OFF,
        pkt.saddr,
        addr,
        pkt.l4_off,
        pkt.sport,
        port,
    )
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call per direction, all offsets explicit"
)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), DropReason> {
    let (csum_off, mangled) = if pkt.proto == PROTO_UDP {
        (pkt.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (pkt.l4_off + 16, 0)
    };
    // The L4 checksum goes through the kernel's helper: how to update it depends on the skb's
    // checksum state (a checksum offloaded to the device holds only the pseudo-header sum), which
    // programs cannot read. The IPv4 header checksum is always complete: it is updated in place.
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(new_addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .map_err(|_| DropReason::NatFailed)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )
        .map_err(|_| DropReason::NatFailed)?;
        let port = header_mut::<2>(ctx, port_off).ok_or(DropReason::NatFailed)?;
        // SAFETY: in bounds (checked by `header_mut`), no helper call since.
        unsafe { *port = new_port.to_ne_bytes() };
    }
    if old_addr != new_addr {
        let ip = header_mut::<20>(ctx, IPV4_OFF).ok_or(DropReason::NatFailed)?;
        // SAFETY: in bounds (checked by `header_mut`), no helper call since.
        let ip = unsafe { &mut *ip };
        let at = addr_off - IPV4_OFF;
        ip[at..at + 4].copy_from_slice(&new_addr.to_ne_bytes());
        let csum = u16::from_ne_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&csum_replace4(csum, old_addr, new_addr).to_ne_bytes());
    }
    Ok(())
}

/// An Internet checksum after one 32-bit word of the data changed (RFC 1624, eqn. 3). Byte order
/// does not matter as long as all three are in the same one.
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!csum)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
