//! NetworkPolicy: judges the new flows of enforced local pods, on the pod's interface, after
//! translation (a Service flow is judged on its backend and the backend's port), and records the
//! admitted ones in conntrack so their later packets and replies pass without a policy lookup.
//!
//! ```text
//!  from_pod: the pod's egress (peer = destination)   to_pod: the pod's ingress (peer = source)
//!  generation = NODE.policy_epoch & 1: every lookup below reads that generation's half
//!  POLICY_EP[pod] --none--> not enforced: pass, untracked
//!     | flags: which directions are isolated (or DENY_ALL: fail closed)
//!  POLICY_IDS[peer] --> identity --> POLICY{endpoint, dir, gen, identity, proto, port}
//!                                 \-> POLICY{endpoint, dir, gen, any peer, proto, port} --none--> drop
//!  admitted: CONNTRACK {pod -> peer} (from_pod) and {peer -> pod} (to_pod), NO_NAT, the epoch
//! ```
//!
//! Conntrack entries carry the policy epoch they were judged under (`NODE.policy_epoch`); after
//! the agent changes the policy maps it bumps the epoch, and each flow is judged again on its
//! next packet: a connection a policy stops allowing is cut, one it still allows goes on.
use aya_ebpf::maps::lpm_trie::Key;
use dataplane_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CT_FLAG_HAIRPIN, CT_FLAG_INGRESS, CT_FLAG_NO_NAT, CtKey, CtValue,
    DropReason, EP_DENY_ALL, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EventRate, NODE_FLAG_POLICY,
    POLICY_ANY_PEER, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_EVENTS_PER_CPU_SECOND,
    PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PolicyEndpoint, PolicyEvent, PolicyKey, VERDICT_ALLOWED,
    VERDICT_DENIED, VERDICT_FAIL_CLOSED,
};

use crate::ct;
use crate::ctx::PacketCtx;
use crate::icmp::IcmpError;
use crate::maps::{
    CONNTRACK, NODE, POLICY, POLICY_EP, POLICY_EVENT_RATE, POLICY_EVENTS, POLICY_IDS, POLICY_STATS,
};
use crate::parse::{IPV4_OFF, Packet, TCP_FLAG_ACK};

const ETH_P_IP: u16 = 0x0800;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// The current policy epoch, when some local pod is enforced.
#[inline(always)]
pub fn epoch() -> Option<u32> {
    let node = NODE.get(0)?;
    (node.flags & NODE_FLAG_POLICY != 0).then_some(node.policy_epoch)
}

/// The policy epoch new conntrack entries are stamped with.
#[inline(always)]
pub fn current_epoch() -> u32 {
    NODE.get(0).map_or(0, |n| n.policy_epoch)
}

/// Local pod `addr` in the current generation (endpoint 0: not enforced there).
#[inline(always)]
fn endpoint(addr: u32) -> Option<PolicyEndpoint> {
    let generation = (current_epoch() & 1) as usize;
    // SAFETY: the value is copied out at once.
    let ep = unsafe { POLICY_EP.get(addr) }?.generation[generation];
    (ep.endpoint != 0).then_some(ep)
}

/// Whether local pod `addr` is selected by a policy (its flows are judged).
#[inline(always)]
pub fn enforced(addr: u32) -> bool {
    endpoint(addr).is_some()
}

/// One flow as the policy stage judges it, packed into two registers (a BPF call takes five):
/// the local pod's and the peer's ports (network byte order), the direction and protocol.
#[inline(always)]
fn flow(dir: u8, proto: u8, local_port: u16, peer_port: u16) -> (u32, u32) {
    (
        u32::from(local_port) | (u32::from(peer_port) << 16),
        u32::from(dir) | (u32::from(proto) << 8),
    )
}

/// Judges one new flow of local pod `local` with `peer` (`ports`, `dir_proto` from [`flow`]);
/// the port a rule names is the destination's: the pod's own for ingress, the peer's for egress.
/// `Ok(false)`: the pod is not enforced (nothing to track); `Ok(true)`: enforced and admitted
/// (track the flow); `Err`: denied. Counted per endpoint and direction; a verdict in an isolated
/// direction is also an event (rate-limited).
#[inline(never)]
pub fn judge(local: u32, peer: u32, ports: u32, dir_proto: u32) -> Result<bool, DropReason> {
    let Some(ep) = endpoint(local) else {
        return Ok(false);
    };
    let (dir, proto) = (dir_proto as u8, (dir_proto >> 8) as u8);
    let (local_port, peer_port) = (ports as u16, (ports >> 16) as u16);
    // The event is filled in as the flow is judged, in this CPU's slot of map memory: values
    // kept there are not spilled to the stack across the lookups.
    let scratch = POLICY_EVENT_RATE.get_ptr_mut(0);
    if let Some(r) = scratch {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*r).event = PolicyEvent {
                local,
                peer,
                local_port,
                peer_port,
                policy_id: 0,
                endpoint: u16::from_be(ep.endpoint),
                proto,
                dir,
                verdict: VERDICT_DENIED,
                pad: [0; 3],
            };
        }
    }
    let port = if dir == POLICY_DIR_INGRESS {
        local_port
    } else {
        peer_port
    };
    let verdict = admits(&ep, dir, peer, proto, port);
    let slot = u32::from(u16::from_be(ep.endpoint)) * 2 + u32::from(dir);
    if let Some(stats) = POLICY_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            if verdict.is_ok() {
                (*stats).allowed += 1;
            } else {
                (*stats).denied += 1;
            }
        }
    }
    let (code, policy_id) = match verdict {
        Ok(None) => return Ok(true),
        Ok(Some(id)) => (VERDICT_ALLOWED, id),
        Err(DropReason::PolicyFailClosed) => (VERDICT_FAIL_CLOSED, 0),
        Err(_) => (VERDICT_DENIED, 0),
    };
    if let Some(r) = scratch {
        // SAFETY: as above.
        unsafe {
            (*r).event.verdict = code;
            (*r).event.policy_id = policy_id;
            if within_event_budget(&mut *r) {
                let _ = POLICY_EVENTS.output::<PolicyEvent>(&(*r).event, 0);
            }
        }
    }
    verdict.map(|_| true)
}

/// Whether this CPU may send another event this second (the agent's clock decides the second).
#[inline(always)]
fn within_event_budget(rate: &mut EventRate) -> bool {
    let second = ct::now_ns() / 1_000_000_000;
    if rate.second != second {
        rate.second = second;
        rate.sent = 0;
    }
    if rate.sent >= POLICY_EVENTS_PER_CPU_SECOND {
        rate.suppressed += 1;
        return false;
    }
    rate.sent += 1;
    true
}

/// `Ok(None)`: the direction is not isolated; `Ok(Some(policy id))`: admitted by that policy.
#[inline(always)]
fn admits(
    ep: &PolicyEndpoint,
    dir: u8,
    peer: u32,
    proto: u8,
    port: u16,
) -> Result<Option<u32>, DropReason> {
    if ep.flags & EP_DENY_ALL != 0 {
        return Err(DropReason::PolicyFailClosed);
    }
    let (isolated, denied) = if dir == POLICY_DIR_INGRESS {
        (EP_INGRESS_ISOLATED, DropReason::PolicyIngress)
    } else {
        (EP_EGRESS_ISOLATED, DropReason::PolicyEgress)
    };
    if ep.flags & isolated == 0 {
        return Ok(None);
    }
    let identity = POLICY_IDS
        .get(Key::new(32, peer))
        .map(|ids| ids.generation[usize::from(ep.generation & 1)])
        .ok_or(DropReason::PolicyFailClosed)?;
    let mut key = Key::new(
        96,
        PolicyKey {
            endpoint: ep.endpoint,
            dir,
            generation: ep.generation & 1,
            identity: identity.to_be(),
            proto,
            pad2: 0,
            port,
        },
    );
    if let Some(v) = POLICY.get(&key) {
        return Ok(Some(v.policy_id));
    }
    key.data.identity = POLICY_ANY_PEER;
    if let Some(v) = POLICY.get(&key) {
        return Ok(Some(v.policy_id));
    }
    Err(denied)
}

/// An entry judged under an older epoch (some local pod is enforced): judge its flow again.
/// `local_is_source`: the hook sees the local pod's packets (`from_pod`), else packets to it.
/// Admitted: stamped with the current epoch; denied: the packet is dropped, the entry left as it
/// is (its next packet is judged again). A call of its own (a BPF-to-BPF call, not a helper):
/// its lookups stay off the pipeline's stack.
#[inline(never)]
pub fn recheck(ct: &mut CtValue, pkt: &Packet, local_is_source: bool) -> Result<(), DropReason> {
    let Some(epoch) = epoch() else {
        return Ok(());
    };
    if ct.policy_epoch == epoch {
        return Ok(());
    }
    let ingress = ct.flags & CT_FLAG_INGRESS != 0;
    let (local, peer, ports, dir) = flow_of(
        local_is_source,
        ingress,
        (pkt.saddr, pkt.sport),
        (pkt.daddr, pkt.dport),
        (ct.nat_addr, ct.nat_port),
    );
    judge(
        local,
        peer,
        ports,
        u32::from(dir) | (u32::from(pkt.proto) << 8),
    )?;
    if ct.flags & CT_FLAG_HAIRPIN != 0 {
        // The pod is its own backend: its ingress, on the backend port it was given.
        let (ports, dir_proto) = flow(POLICY_DIR_INGRESS, pkt.proto, ct.nat_port, pkt.sport);
        judge(local, local, ports, dir_proto)?;
    }
    ct.policy_epoch = epoch;
    Ok(())
}

/// Which pod, peer, ports and direction a tracked flow is judged on, from one of its packets
/// (`src`, `dst`) as a hook sees it: `local_is_source` for `from_pod`, `ingress` for a flow the
/// peer opened; `to` is what a flow the pod opened was sent to (the backend). The ports are
/// packed as [`flow`] packs them.
#[inline(always)]
fn flow_of(
    local_is_source: bool,
    ingress: bool,
    src: (u32, u16),
    dst: (u32, u16),
    to: (u32, u16),
) -> (u32, u32, u32, u8) {
    let dir = if ingress {
        POLICY_DIR_INGRESS
    } else {
        POLICY_DIR_EGRESS
    };
    let ((local, local_port), (peer, peer_port)) = match (local_is_source, ingress) {
        // from_pod, a flow the pod opened: the destination it was sent to (the backend).
        (true, false) => (src, to),
        // from_pod, the pod's reply in a flow the peer opened.
        (true, true) => (src, dst),
        // to_pod: a reply in a flow the pod opened, or a packet of one the peer opened.
        (false, _) => (dst, src),
    };
    let (ports, _) = flow(dir, 0, local_port, peer_port);
    (local, peer, ports, dir)
}

/// Records an admitted flow of a local pod that nothing translates: `key` is the pod's side of
/// it (the entry `from_pod` finds for the pod's packets: pod -> peer), and its reverse the entry
/// `to_pod` finds for the peer's. `flags`: `CT_FLAG_INGRESS` when the peer opened it, and
/// closing. Failing to record is a drop (fail closed). A call of its own: its keys and entry stay
/// off the calling pipeline's stack.
#[inline(never)]
fn track(key: &CtKey, flags: u16) -> Result<(), DropReason> {
    // Both entries name the peer: a flow the pod opened is judged again on where it was sent.
    let mut entry = ct::entry(key.daddr, key.dport, CT_FLAG_NO_NAT | flags, 0, 0);
    entry.policy_epoch = current_epoch();
    let to_pod = CtKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        dir: CT_DIR_REPLY,
        pad: 0,
    };
    CONNTRACK
        .insert(to_pod, entry, 0)
        .map_err(|_| DropReason::CtCreateFailed)?;
    CONNTRACK
        .insert(key, entry, 0)
        .map_err(|_| DropReason::CtCreateFailed)
}

/// The pod's side of a flow between `local` and `peer` (address, port).
#[inline(always)]
fn pod_side(local: (u32, u16), peer: (u32, u16), proto: u8) -> CtKey {
    CtKey {
        saddr: local.0,
        daddr: peer.0,
        sport: local.1,
        dport: peer.1,
        proto,
        dir: CT_DIR_SERVICE,
        pad: 0,
    }
}

/// A new TCP/UDP flow the pod sends that is not to a Service frontend: its egress.
#[inline(never)]
pub fn new_from_pod(pkt: &Packet) -> Result<(), DropReason> {
    if epoch().is_none() {
        return Ok(());
    }
    let (ports, dir_proto) = flow(POLICY_DIR_EGRESS, pkt.proto, pkt.sport, pkt.dport);
    if judge(pkt.saddr, pkt.daddr, ports, dir_proto)? {
        track(&pkt.ct_key(CT_DIR_SERVICE), ct::closing_flags(pkt))?;
    }
    Ok(())
}

/// A new TCP/UDP flow towards the pod: its ingress. `from_node`: the node's own stack sent it
/// (a pod cannot block its resident node, as the API reference says: kubelet probes), admitted
/// and tracked. A TCP segment other than a SYN that no entry knows (a connection the pod opened
/// before it was enforced, or whose entry was evicted) is admitted as the reply it claims to be
/// when the pod's egress admits the reverse flow.
#[inline(never)]
pub fn new_to_pod(pkt: &Packet, from_node: bool) -> Result<(), DropReason> {
    if epoch().is_none() {
        return Ok(());
    }
    let (enforced, opened_by_peer) = if from_node {
        (enforced(pkt.daddr), true)
    } else {
        let (ports, dir_proto) = flow(POLICY_DIR_INGRESS, pkt.proto, pkt.dport, pkt.sport);
        match judge(pkt.daddr, pkt.saddr, ports, dir_proto) {
            Ok(enforced) => (enforced, true),
            Err(denied) if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_FLAG_ACK != 0 => {
                let (ports, dir_proto) = flow(POLICY_DIR_EGRESS, pkt.proto, pkt.dport, pkt.sport);
                judge(pkt.daddr, pkt.saddr, ports, dir_proto).map_err(|_| denied)?;
                (true, false)
            }
            Err(denied) => return Err(denied),
        }
    };
    if enforced {
        let flags = if opened_by_peer { CT_FLAG_INGRESS } else { 0 };
        track(
            &pod_side((pkt.daddr, pkt.dport), (pkt.saddr, pkt.sport), pkt.proto),
            flags | ct::closing_flags(pkt),
        )?;
    }
    Ok(())
}

/// An IPv4 packet the translation pipeline leaves alone (not TCP/UDP, or a fragment), of an
/// enforced pod: judged like a flow. SCTP and ICMP echo are tracked (SCTP by its ports, ICMP by
/// the address pair); an ICMP error passes when it is about a tracked flow; a non-first fragment
/// carries no ports, so only a rule that admits every port of its protocol admits it.
/// `from_node`: to the pod, sent by the node's own stack (admitted, see [`new_to_pod`]). A call
/// of its own, off the translation pipeline's stack.
#[inline(never)]
pub fn other<C: PacketCtx>(
    ctx: &C,
    local_is_source: bool,
    from_node: bool,
) -> Result<(), DropReason> {
    let Some(epoch) = epoch() else {
        return Ok(());
    };
    let head: [u8; 2] = ctx.load(12).ok_or(DropReason::Malformed)?;
    if u16::from_be_bytes(head) != ETH_P_IP {
        return Ok(());
    }
    let ip: [u8; 20] = ctx.load(IPV4_OFF).ok_or(DropReason::Malformed)?;
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let (local, peer, dir) = if local_is_source {
        (saddr, daddr, POLICY_DIR_EGRESS)
    } else {
        (daddr, saddr, POLICY_DIR_INGRESS)
    };
    if !enforced(local) {
        return Ok(());
    }
    let proto = ip[9];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4_off = IPV4_OFF + ihl;
    let offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if from_node {
        return Ok(());
    }
    if offset != 0 {
        judge(local, peer, 0, u32::from(dir) | (u32::from(proto) << 8))?;
        return Ok(());
    }
    let (sport, dport) = match proto {
        PROTO_SCTP => {
            let ports: [u8; 4] = ctx.load(l4_off).ok_or(DropReason::Malformed)?;
            (
                u16::from_ne_bytes([ports[0], ports[1]]),
                u16::from_ne_bytes([ports[2], ports[3]]),
            )
        }
        PROTO_ICMP => {
            let ty: u8 = ctx.load(l4_off).ok_or(DropReason::Malformed)?;
            if matches!(
                ty,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            ) && related(ctx, local_is_source)
            {
                return Ok(());
            }
            (0, 0)
        }
        _ => (0, 0),
    };
    let key = CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        dir: if local_is_source {
            CT_DIR_SERVICE
        } else {
            CT_DIR_REPLY
        },
        pad: 0,
    };
    if let Some(ct) = ct::lookup(key) {
        if ct.policy_epoch == epoch {
            return Ok(());
        }
        let (local, peer, ports, dir) = flow_of(
            local_is_source,
            ct.flags & CT_FLAG_INGRESS != 0,
            (saddr, sport),
            (daddr, dport),
            (ct.nat_addr, ct.nat_port),
        );
        judge(local, peer, ports, u32::from(dir) | (u32::from(proto) << 8))?;
        ct.policy_epoch = epoch;
        return Ok(());
    }
    let (local_port, peer_port) = if local_is_source {
        (sport, dport)
    } else {
        (dport, sport)
    };
    let (ports, dir_proto) = flow(dir, proto, local_port, peer_port);
    judge(local, peer, ports, dir_proto)?;
    let flags = if local_is_source { 0 } else { CT_FLAG_INGRESS };
    track(
        &pod_side((local, local_port), (peer, peer_port), proto),
        flags,
    )
}

/// Whether an ICMP error is about a flow conntrack knows: to the pod, about a packet it sent
/// (the reply entry of its flow); from the pod, about a packet it received.
#[inline(always)]
fn related<C: PacketCtx>(ctx: &C, local_is_source: bool) -> bool {
    let Some(err) = IcmpError::parse(ctx) else {
        return false;
    };
    let mut key = err.reply_key();
    if local_is_source {
        // The quote is the peer's packet to the pod: the pod's side of that flow.
        key.dir = CT_DIR_SERVICE;
    }
    ct::lookup(key).is_some()
}

/// A new service flow of a pod, judged on the backend it was given: the pod's egress to it (and,
/// for a pod that is its own backend, its ingress too). Admitted: the policy epoch its entries
/// are stamped with.
#[inline(always)]
pub fn new_service_flow(
    pkt: &Packet,
    backend: (u32, u16),
    hairpin: bool,
) -> Result<u32, DropReason> {
    let Some(epoch) = epoch() else {
        return Ok(current_epoch());
    };
    let (ports, dir_proto) = flow(POLICY_DIR_EGRESS, pkt.proto, pkt.sport, backend.1);
    judge(pkt.saddr, backend.0, ports, dir_proto)?;
    if hairpin {
        let (ports, dir_proto) = flow(POLICY_DIR_INGRESS, pkt.proto, backend.1, pkt.sport);
        judge(pkt.saddr, pkt.saddr, ports, dir_proto)?;
    }
    Ok(epoch)
}
