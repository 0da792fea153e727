//! The pipelines on the node's external interfaces: traffic from outside the node to NodePorts,
//! LoadBalancer IPs and externalIPs (`SCOPE_EXTERNAL` frontends), and the way back.
//!
//! ```text
//!  from_external (XDP):   parse -> conntrack: client's packet -> DNAT (+ SNAT)      -> forward
//!                                             SNATed reply    -> un-SNAT, un-DNAT   -> forward
//!                         -> external lookup -> source ranges -> backend pick
//!                            local backend, or eTP Local: conntrack, DNAT           -> kernel
//!                            remote backend, eTP Cluster: SNAT port, conntrack, DNAT + SNAT
//!                                                                                   -> forward
//!  to_external (TC egress): parse -> conntrack (a local backend's reply) -> reverse NAT (SNAT)
//! ```
//! ICMP errors about these flows are translated back too: a local backend's (or a router's) on
//! the way out (`to_external`), and those sent to the node's source-NAT port on the way in
//! (`from_external`, then on to the client).
//!
//! "forward" sends a rewritten packet straight back out of the interface it came in on when the
//! FIB says that is the way (XDP_TX, with the next hop's MAC and the TTL decremented), and hands
//! it to the kernel otherwise (a local backend, an unresolved neighbour, another interface). The
//! next hop is kept in the flow's entry, so an established flow asks the FIB once a second (when
//! its entry is refreshed), not per packet.
//! Source NAT uses the node's address and a port in `NODE`'s range, chosen by inserting the reply
//! entry into `SNAT` with `BPF_NOEXIST`: `SNAT` is not LRU, so a taken port is never reused while
//! its entry lives, and the forward direction re-checks its claim only when its entry is
//! refreshed (and on FIN/RST, which it passes on to the claim).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK,
        bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{
    BACKEND_LOCAL, CT_DIR_REPLY, CT_DIR_SERVICE, CT_FLAG_HAIRPIN, CT_FLAG_SNAT, CtKey, CtValue,
    DropReason, SCOPE_EXTERNAL, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_LOCAL,
};

use crate::counters::{count_drop, count_flow, count_service};
use crate::csum::csum_replace2;
use crate::ctx::PacketCtx;
use crate::icmp::{IcmpError, Rewrite};
use crate::maps::{CONNTRACK, NODE, SNAT};
use crate::nat::{nat_dst, nat_src};
use crate::parse::{IPV4_OFF, Packet, header_mut};
use crate::{ct, lb, reject};

/// Ports tried for one new source-NATed flow before it is dropped as `SnatFailed`.
const SNAT_TRIES: u32 = 16;
const AF_INET: u8 = 2;

pub fn try_from_external(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return snat_icmp_error(ctx);
    };
    if let Some((ct, refreshed)) = ct::established(&pkt) {
        count_service(ct.rev_nat_id, ctx.len());
        nat_dst(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
        if ct.flags & CT_FLAG_SNAT == 0 {
            return Ok(XDP_PASS);
        }
        if refreshed || ct::closing_flags(&pkt) != 0 {
            still_ours(&pkt, ct)?;
        }
        if refreshed {
            ct.next_hop = [0; 12];
        }
        nat_src(ctx, &pkt, ct.snat_addr, ct.snat_port)?;
        return Ok(forward(ctx, ct.nat_addr, &mut ct.next_hop));
    }
    // Replies of other connections (pods') are the pod interfaces' business: only source-NATed
    // ones have entries here.
    if let Some(ct) = SNAT.get_ptr_mut(pkt.ct_key(CT_DIR_REPLY)) {
        // SAFETY: from a successful lookup, valid for this run; racing writers can at worst lose
        // a refresh or a cached next hop.
        let ct = unsafe { &mut *ct };
        if ct::track(ct, &pkt) {
            ct.next_hop = [0; 12];
        }
        nat_src(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
        nat_dst(ctx, &pkt, ct.snat_addr, ct.snat_port)?;
        return Ok(forward(ctx, ct.snat_addr, &mut ct.next_hop));
    }

    let frontend = lb::Frontend::scoped(&pkt, SCOPE_EXTERNAL);
    let Some(header) = lb::lookup(&frontend) else {
        return Ok(XDP_PASS);
    };
    count_service(header.rev_nat_id, ctx.len());
    lb::admit(&header, pkt.saddr)?;
    if header.count == 0 {
        if header.flags & SVC_FLAG_DROP_EMPTY != 0 {
            return Err(DropReason::NoLocalBackend);
        }
        // No endpoint at all: kube-proxy rejects. A NodePort is one of this node's own addresses,
        // where nothing listens on the port: the kernel answers with an RST or a port
        // unreachable, as kube-proxy's REJECT does. A LoadBalancer IP or externalIP the node
        // would forward is answered here, with the same refusal, sent back to the client.
        count_drop(DropReason::NoBackend);
        if is_local(ctx, pkt.daddr) {
            return Ok(XDP_PASS);
        }
        return reject::reply::<_, false>(ctx, &pkt).map(|action| action as u32);
    }
    let key = pkt.ct_key(CT_DIR_SERVICE);
    let (backend_id, backend) = lb::pick(&frontend, &header)?;
    count_flow(header.rev_nat_id);
    // A backend needs source NAT when its replies would not come back through this node: not
    // under eTP Local, not a local endpoint, and routed back out of the interface the packet
    // came in on (an endpoint without nodeName that is a local pod is routed elsewhere).
    let route = fib(ctx, backend.addr);
    let snat = header.flags & SVC_FLAG_EXTERNAL_LOCAL == 0
        && backend.flags & BACKEND_LOCAL == 0
        && route.is_none_or(|(ifindex, _)| ifindex == ctx.ingress_ifindex() as u32);
    // The reply entry; for a source-NATed flow it becomes the forward entry in place once its
    // port is claimed (one value on the stack, which the verifier caps at 512 bytes).
    let mut entry = ct::entry(
        pkt.daddr,
        pkt.dport,
        ct::closing_flags(&pkt),
        backend_id,
        header.rev_nat_id,
    );
    let reply_key = CtKey {
        saddr: backend.addr,
        daddr: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        pad: 0,
    };
    if !snat {
        ct::create(key, reply_key, entry, (backend.addr, backend.port))?;
        nat_dst(ctx, &pkt, backend.addr, backend.port)?;
        return Ok(XDP_PASS);
    }

    // Read in place, not copied: the stack is short.
    let node = NODE.get(0).ok_or(DropReason::SnatFailed)?;
    if node.snat_addr == 0 || node.snat_port_max < node.snat_port_min {
        return Err(DropReason::SnatFailed);
    }
    entry.flags |= CT_FLAG_SNAT;
    entry.snat_addr = pkt.saddr;
    entry.snat_port = pkt.sport;
    let port = snat_port(
        CtKey {
            daddr: node.snat_addr,
            ..reply_key
        },
        &entry,
        node.snat_port_min,
        node.snat_port_max,
    )?;
    entry.nat_addr = backend.addr;
    entry.nat_port = backend.port;
    entry.snat_addr = node.snat_addr;
    entry.snat_port = port;
    entry.next_hop = route.map_or([0; 12], |(_, hop)| hop);
    if CONNTRACK.insert(key, entry, 0).is_err() {
        let _ = SNAT.remove(CtKey {
            daddr: node.snat_addr,
            dport: port,
            ..reply_key
        });
        return Err(DropReason::CtCreateFailed);
    }
    nat_dst(ctx, &pkt, backend.addr, backend.port)?;
    nat_src(ctx, &pkt, node.snat_addr, port)?;
    Ok(forward(ctx, backend.addr, &mut entry.next_hop))
}

/// A local backend's reply to a client outside the node: the frontend becomes its source again.
pub fn try_to_external(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = Packet::parse(ctx)? else {
        crate::path::reverse_icmp_error(ctx)?;
        return Ok(TC_ACT_OK);
    };
    let Some(ct) = ct::lookup(pkt.ct_key(CT_DIR_REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    if ct.flags & CT_FLAG_HAIRPIN != 0 {
        return Ok(TC_ACT_OK);
    }
    ct::track(ct, &pkt);
    nat_src(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
    Ok(TC_ACT_OK)
}

/// An ICMP error to the node about a source-NATed flow (the backend's port unreachable, a
/// router's fragmentation needed): it goes on to the client, quoting what the client sent.
#[inline(always)]
fn snat_icmp_error(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(err) = IcmpError::parse(ctx) else {
        return Ok(XDP_PASS);
    };
    // SAFETY: the value is copied out at once.
    let Some(ct) = (unsafe { SNAT.get(err.reply_key()) }).copied() else {
        return Ok(XDP_PASS);
    };
    let (client, client_port) = (ct.snat_addr, ct.snat_port);
    err.rewrite(
        ctx,
        &Rewrite {
            outer_saddr: (err.outer_saddr == err.inner_daddr).then_some(ct.nat_addr),
            outer_daddr: Some(client),
            inner_src: Some((client, client_port)),
            inner_dst: Some((ct.nat_addr, ct.nat_port)),
        },
    )?;
    Ok(forward(ctx, client, &mut [0; 12]))
}

/// Claims a free source port for a new flow by inserting its reply entry (`reply_key` with the
/// port as destination) only where none exists, trying `SNAT_TRIES` ports scattered over the
/// range.
#[inline(always)]
fn snat_port(mut reply_key: CtKey, reply: &CtValue, min: u16, max: u16) -> Result<u16, DropReason> {
    let size = u32::from(max - min) + 1;
    // SAFETY: helper call without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    // A random start and a random odd stride: the tries scatter over the range instead of
    // probing one run of neighbours, which a filling range turns into long taken clusters.
    let (start, stride) = (r & 0xffff, (r >> 16) | 1);
    for i in 0..SNAT_TRIES {
        let port = min + (start.wrapping_add(i.wrapping_mul(stride)) % size) as u16;
        reply_key.dport = port.to_be();
        if SNAT
            .insert(reply_key, *reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(port.to_be());
        }
    }
    Err(DropReason::SnatFailed)
}

/// A source-NATed flow's claim lives while the flow does (the agent sweeps it only when idle, and
/// this refreshes it): checked when the forward entry is refreshed or closes, and refreshed or
/// marked closing with it. Gone or taken by another client since (an idle flow's claim swept),
/// the flow is dropped, so no reply ever reaches the wrong client.
#[inline(always)]
fn still_ours(pkt: &Packet, ct: &CtValue) -> Result<(), DropReason> {
    let reply_key = CtKey {
        saddr: ct.nat_addr,
        daddr: ct.snat_addr,
        sport: ct.nat_port,
        dport: ct.snat_port,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        pad: 0,
    };
    let Some(reply) = SNAT.get_ptr_mut(reply_key) else {
        return Err(DropReason::SnatFailed);
    };
    // SAFETY: from a successful lookup, valid for this run.
    let reply = unsafe { &mut *reply };
    if reply.snat_addr != pkt.saddr || reply.snat_port != pkt.sport {
        return Err(DropReason::SnatFailed);
    }
    if ct::track(reply, pkt) {
        reply.next_hop = [0; 12];
    }
    Ok(())
}

/// The FIB's next hop towards `daddr`, when it has a resolved one: the egress interface and the
/// MACs a packet leaves with (the next hop's, then the interface's). A call of its own, so the
/// request's 64 bytes are not on the pipeline's stack (BPF allows 512 for a whole call chain).
#[inline(never)]
fn fib(ctx: &XdpContext, daddr: u32) -> Option<(u32, [u8; 12])> {
    let (rc, fib) = fib_lookup(ctx, daddr);
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    let mut hop = [0u8; 12];
    hop[..6].copy_from_slice(&fib.dmac);
    hop[6..].copy_from_slice(&fib.smac);
    Some((fib.ifindex, hop))
}

/// `bpf_fib_lookup` towards `daddr` from the ingress interface: its return code and result.
#[inline(always)]
fn fib_lookup(ctx: &XdpContext, daddr: u32) -> (i64, FibParams) {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: helper call with the program's own context and a request on this stack frame.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc, fib)
}

/// Whether `daddr` is one of this node's own addresses (the FIB does not forward it).
#[inline(never)]
fn is_local(ctx: &XdpContext, daddr: u32) -> bool {
    fib_lookup(ctx, daddr).0 == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
}

/// Sends a rewritten packet towards `daddr`: back out of this interface from XDP when the FIB
/// routes it there and knows the next hop's MAC, to the kernel otherwise. `hop` is the flow's
/// cached next hop: used when set, filled from the FIB when not.
#[inline(always)]
fn forward(ctx: &XdpContext, daddr: u32, hop: &mut [u8; 12]) -> u32 {
    if *hop == [0; 12] {
        let Some((ifindex, found)) = fib(ctx, daddr) else {
            return XDP_PASS;
        };
        if ifindex != ctx.ingress_ifindex() as u32 {
            return XDP_PASS;
        }
        *hop = found;
    }
    let Some(ip) = header_mut::<20, XdpContext>(ctx, IPV4_OFF) else {
        return XDP_PASS;
    };
    // SAFETY: in bounds (checked by `header_mut`), no helper call since.
    let ip = unsafe { &mut *ip };
    if ip[8] <= 1 {
        // The kernel answers with ICMP time exceeded.
        return XDP_PASS;
    }
    let old = u16::from_ne_bytes([ip[8], ip[9]]);
    ip[8] -= 1;
    let new = u16::from_ne_bytes([ip[8], ip[9]]);
    let csum = u16::from_ne_bytes([ip[10], ip[11]]);
    ip[10..12].copy_from_slice(&csum_replace2(csum, old, new).to_ne_bytes());
    if ctx.store(0, hop).is_none() {
        return XDP_PASS;
    }
    XDP_TX
}
