//! Conntrack: one entry per direction of a translated connection, keyed by the full 5-tuple and
//! the direction. The entry holds the connection's state (flags, last seen) and, as one attribute
//! of it, the translation to apply (`nat_addr`, `nat_port`).
use dataplane_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CT_FLAG_CLOSING, CtKey, CtValue, DropReason, PROTO_UDP,
};

use crate::maps::{CLOCK, CONNTRACK};
use crate::parse::{Packet, TCP_FLAG_FIN, TCP_FLAG_RST};

/// A conntrack entry's last-seen time is refreshed at most this often, to keep per-packet map writes
/// rare.
const CT_REFRESH_NS: u64 = 1_000_000_000;

/// The conntrack entry of a tuple, to read and to refresh.
#[inline(always)]
pub fn lookup(key: CtKey) -> Option<&'static mut CtValue> {
    let ct = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and stays valid for this program run; the
    // entry's flags and timestamp are only ever set (racing writers can at worst lose a refresh).
    Some(unsafe { &mut *ct })
}

/// The entry of a packet's tuple in the client's direction, unless the packet reopens the tuple
/// (a SYN after FIN/RST is a new connection); tracked when returned, with whether its timestamp
/// was refreshed (see [`track`]).
#[inline(always)]
pub fn established(pkt: &Packet) -> Option<(&'static mut CtValue, bool)> {
    let ct = lookup(pkt.ct_key(CT_DIR_SERVICE))?;
    if pkt.is_tcp_syn() && ct.flags & CT_FLAG_CLOSING != 0 {
        return None;
    }
    let refreshed = track(ct, pkt);
    Some((ct, refreshed))
}

/// A new entry, stamped now: the translation to apply to its direction, the connection's state
/// (policy epoch 0: the pod paths set theirs).
#[inline(always)]
pub fn entry(
    nat_addr: u32,
    nat_port: u16,
    flags: u16,
    backend_id: u32,
    rev_nat_id: u16,
) -> CtValue {
    CtValue {
        nat_addr,
        nat_port,
        flags,
        backend_id,
        rev_nat_id,
        pad: 0,
        last_seen_ns: now_ns(),
        snat_addr: 0,
        snat_port: 0,
        pad2: 0,
        next_hop: [0; 12],
        policy_epoch: 0,
    }
}

/// Records a new connection: the reply entry goes in first, so the backend's first answer always
/// finds it; the forward entry is the same with the backend (`to`) as its translation (one value
/// on the stack: the verifier caps a program's stack at 512 bytes). Both inserts overwrite: a
/// reopened tuple (SYN after FIN/RST) replaces its stale entries. Failing to record is a drop
/// (`CtCreateFailed`), never an untracked translation.
#[inline(always)]
pub fn create(
    forward_key: CtKey,
    reply_key: CtKey,
    mut entry: CtValue,
    to: (u32, u16),
) -> Result<(), DropReason> {
    CONNTRACK
        .insert(reply_key, entry, 0)
        .map_err(|_| DropReason::CtCreateFailed)?;
    (entry.nat_addr, entry.nat_port) = to;
    CONNTRACK
        .insert(forward_key, entry, 0)
        .map_err(|_| DropReason::CtCreateFailed)
}

#[inline(always)]
pub fn closing_flags(pkt: &Packet) -> u16 {
    if pkt.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        CT_FLAG_CLOSING
    } else {
        0
    }
}

/// The agent's clock (see [`CLOCK`]).
#[inline(always)]
pub fn now_ns() -> u64 {
    CLOCK.get(0).copied().unwrap_or(0)
}

/// Marks the entry closing on FIN/RST and refreshes its timestamp, at most once a second: true
/// when it did (what is cached in the entry is re-checked then).
#[inline(always)]
pub fn track(ct: &mut CtValue, pkt: &Packet) -> bool {
    let closing = closing_flags(pkt);
    if ct.flags & closing != closing {
        ct.flags |= closing;
    }
    let now = now_ns();
    let refresh = now.wrapping_sub(ct.last_seen_ns) > CT_REFRESH_NS;
    if refresh {
        ct.last_seen_ns = now;
    }
    refresh
}

/// A pod opens a connection straight to an address that a Service connection of the same source
/// port was translated to (the kernel picks source ports per destination, so this happens). On the
/// wire both are the same tuple, so the backend's answers would match that connection's reply entry
/// and be rewritten to the Service address: the pod's newer connection wins, and the Service
/// connection's entries go. Checked on a TCP SYN, and on every UDP datagram (no handshake).
#[inline(always)]
pub fn forget_reused_tuple(pkt: &Packet) {
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
