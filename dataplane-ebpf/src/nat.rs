//! Address translation in place: addresses and ports rewritten with incremental checksum updates.
use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use dataplane_common::{DropReason, PROTO_UDP};

use crate::csum::csum_replace4;
use crate::ctx::PacketCtx;
use crate::parse::{IPV4_OFF, Packet, header_mut};

pub const IP_SADDR_OFF: usize = IPV4_OFF + 12;
pub const IP_DADDR_OFF: usize = IPV4_OFF + 16;

/// Rewrites destination address and port, fixing the IPv4 and L4 checksums incrementally.
#[inline(always)]
pub fn nat_dst<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    addr: u32,
    port: u16,
) -> Result<(), DropReason> {
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
pub fn nat_src<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    addr: u32,
    port: u16,
) -> Result<(), DropReason> {
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
pub fn rewrite<C: PacketCtx>(
    ctx: &C,
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
        .ok_or(DropReason::NatFailed)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )
        .ok_or(DropReason::NatFailed)?;
        let port = header_mut::<2, C>(ctx, port_off).ok_or(DropReason::NatFailed)?;
        // SAFETY: in bounds (checked by `header_mut`), no helper call since.
        unsafe { *port = new_port.to_ne_bytes() };
    }
    if old_addr != new_addr {
        let ip = header_mut::<20, C>(ctx, IPV4_OFF).ok_or(DropReason::NatFailed)?;
        // SAFETY: in bounds (checked by `header_mut`), no helper call since.
        let ip = unsafe { &mut *ip };
        let at = addr_off - IPV4_OFF;
        ip[at..at + 4].copy_from_slice(&new_addr.to_ne_bytes());
        let csum = u16::from_ne_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&csum_replace4(csum, old_addr, new_addr).to_ne_bytes());
    }
    Ok(())
}

/// The first 12 bytes of an Ethernet header with destination and source swapped: back to the
/// sender.
#[inline(always)]
pub fn swapped_macs(eth: &[u8; 12]) -> [u8; 12] {
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..]);
    swapped[6..].copy_from_slice(&eth[..6]);
    swapped
}
