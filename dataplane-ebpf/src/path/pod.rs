//! The pipelines on a local pod's host-side interface (TC).
//!
//! ```text
//!  from_pod (TC ingress): parse -> conntrack -> service lookup -> backend pick -> conntrack create
//!                         -> DNAT (| reject, no backend | drop, no local backend or outside the
//!                         source ranges) (| hairpin back to the pod)
//!  to_pod   (TC egress):  parse -> conntrack (reply) -> reverse NAT (SNAT)
//!                         | an ICMP error about a translated flow -> its quote translated back
//!  policy (both):         an enforced pod's new flow is judged (`from_pod`: its egress, after
//!                         DNAT; `to_pod`: its ingress) and tracked; a tracked flow judged under
//!                         an older policy epoch is judged again
//! ```
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use dataplane_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CT_FLAG_HAIRPIN, CT_FLAG_NO_NAT, CtKey, DropReason, HAIRPIN_ADDR,
    SVC_FLAG_DROP_EMPTY, ServiceValue,
};

use crate::counters::{count_drop, count_flow, count_service};
use crate::ctx::PacketCtx;
use crate::nat::{IP_DADDR_OFF, nat_dst, nat_src, rewrite, swapped_macs};
use crate::parse::Packet;
use crate::{ct, lb, policy, reject};

pub fn try_from_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(pkt) = Packet::parse(ctx)? else {
        policy::other(ctx, true, false)?;
        return Ok(TC_ACT_OK);
    };
    if pkt.daddr == HAIRPIN_ADDR {
        return hairpin_reply(ctx, &pkt);
    }
    if let Some((ct, _)) = ct::established(&pkt) {
        policy::recheck(ct, &pkt, true)?;
        if ct.flags & CT_FLAG_NO_NAT != 0 {
            return Ok(TC_ACT_OK);
        }
        count_service(ct.rev_nat_id, ctx.len());
        nat_dst(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
        if ct.flags & CT_FLAG_HAIRPIN != 0 {
            return hairpin(ctx, &pkt, HAIRPIN_ADDR, pkt.sport);
        }
        return Ok(TC_ACT_OK);
    }

    let frontend = lb::Frontend::of(&pkt);
    let Some(header) = lb::lookup(&frontend) else {
        ct::forget_reused_tuple(&pkt);
        policy::new_from_pod(&pkt)?;
        return Ok(TC_ACT_OK);
    };
    count_service(header.rev_nat_id, ctx.len());
    lb::admit(&header, pkt.saddr)?;
    if header.count == 0 {
        if header.flags & SVC_FLAG_DROP_EMPTY != 0 {
            return Err(DropReason::NoLocalBackend);
        }
        count_drop(DropReason::NoBackend);
        return reject::reply::<_, true>(ctx, &pkt);
    }
    new_service_flow(ctx, &pkt, &frontend, &header)
}

/// A new flow to a frontend with backends: pick one, judge the pod's egress to it, record the
/// flow, DNAT. A call of its own: its keys and entry stay off the stack of the reject path.
#[inline(never)]
fn new_service_flow(
    ctx: &TcContext,
    pkt: &Packet,
    frontend: &lb::Frontend,
    header: &ServiceValue,
) -> Result<i32, DropReason> {
    let (backend_id, backend) = lb::pick(frontend, header)?;
    count_flow(header.rev_nat_id);

    let is_hairpin = backend.addr == pkt.saddr;
    let policy_epoch = policy::new_service_flow(pkt, (backend.addr, backend.port), is_hairpin)?;
    let (flags, client_addr) = if is_hairpin {
        (ct::closing_flags(pkt) | CT_FLAG_HAIRPIN, HAIRPIN_ADDR)
    } else {
        (ct::closing_flags(pkt), pkt.saddr)
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
    let mut reply = ct::entry(pkt.daddr, pkt.dport, flags, backend_id, header.rev_nat_id);
    reply.policy_epoch = policy_epoch;
    ct::create(
        pkt.ct_key(CT_DIR_SERVICE),
        reply_key,
        reply,
        (backend.addr, backend.port),
    )?;
    nat_dst(ctx, pkt, backend.addr, backend.port)?;
    if is_hairpin {
        return hairpin(ctx, pkt, HAIRPIN_ADDR, pkt.sport);
    }
    Ok(TC_ACT_OK)
}

pub fn try_to_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    // What `from_pod` bounced back out of this interface (a hairpin, a reject) was judged there.
    // SAFETY: `skb` is the program's own context pointer.
    let (ingress_ifindex, ifindex) =
        unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
    let bounced = ingress_ifindex == ifindex;
    // Locally generated packets have no ingress interface: the node's own stack sent them.
    let from_node = ingress_ifindex == 0;
    let Some(pkt) = Packet::parse(ctx)? else {
        if !bounced {
            policy::other(ctx, false, from_node)?;
        }
        crate::path::reverse_icmp_error(ctx)?;
        return Ok(TC_ACT_OK);
    };
    let Some(ct) = ct::lookup(pkt.ct_key(CT_DIR_REPLY)) else {
        if !bounced {
            policy::new_to_pod(&pkt, from_node)?;
        }
        return Ok(TC_ACT_OK);
    };
    if !bounced {
        policy::recheck(ct, &pkt, false)?;
    }
    ct::track(ct, &pkt);
    if ct.flags & CT_FLAG_NO_NAT != 0 {
        return Ok(TC_ACT_OK);
    }
    nat_src(ctx, &pkt, ct.nat_addr, ct.nat_port)?;
    Ok(TC_ACT_OK)
}

/// The reply of a hairpinned connection, sent by the backend pod to [`HAIRPIN_ADDR`]: restore the
/// service address as its source and the pod itself as its destination.
#[inline(never)]
fn hairpin_reply<C: PacketCtx>(ctx: &C, pkt: &Packet) -> Result<i32, DropReason> {
    let Some(ct) = ct::lookup(pkt.ct_key(CT_DIR_REPLY)) else {
        return Ok(TC_ACT_OK);
    };
    ct::track(ct, pkt);
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
fn hairpin<C: PacketCtx>(ctx: &C, pkt: &Packet, saddr: u32, sport: u16) -> Result<i32, DropReason> {
    nat_src(ctx, pkt, saddr, sport)?;
    let eth: [u8; 12] = ctx.load(0).ok_or(DropReason::NatFailed)?;
    ctx.store(0, &swapped_macs(&eth))
        .ok_or(DropReason::NatFailed)?;
    Ok(ctx.bounce())
}
