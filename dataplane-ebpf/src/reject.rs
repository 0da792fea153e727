//! Active refusal for a service without ready endpoints, as kube-proxy's REJECT rule does: a TCP
//! RST for TCP, an ICMP port unreachable for UDP. The reply is built in place and sent back out of
//! the interface the packet came in on, towards the client (a pod, or a host outside the node).

use aya_ebpf::helpers::bpf_csum_diff;
use dataplane_common::{DropReason, PROTO_TCP};

use crate::ctx::PacketCtx;
use crate::nat::swapped_macs;
use crate::parse::{
    ETH_HLEN, IPV4_OFF, Packet, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const RST_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
/// ICMP errors quote the offending IPv4 header and the first 8 bytes of its payload.
const QUOTE_LEN: usize = IP_HLEN + 8;
const ICMP_HLEN: usize = 8;

/// Builds the refusal and redirects it; packets that cannot be answered (an RST, IP options) are
/// dropped, already counted as `NoBackend` by the caller. With `OUT_OF_LINE` the builders are
/// calls of their own: their buffers get stack frames of their own instead of growing the
/// caller's (BPF allows 512 bytes for a whole call chain, and a call adds its frame to its
/// caller's whole frame); without, they are inlined into a caller whose frame already has room in
/// branches that never run together with this one (stack slots are shared between those).
#[inline(always)]
pub fn reply<C: PacketCtx, const OUT_OF_LINE: bool>(
    ctx: &C,
    pkt: &Packet,
) -> Result<i32, DropReason> {
    if pkt.ihl != IP_HLEN || pkt.tcp_flags & TCP_FLAG_RST != 0 {
        return Ok(ctx.drop_action());
    }
    let eth: [u8; 12] = ctx.load(0).ok_or(DropReason::RejectFailed)?;
    match (pkt.proto == PROTO_TCP, OUT_OF_LINE) {
        (true, true) => tcp_rst_call(ctx, pkt, &eth)?,
        (true, false) => tcp_rst(ctx, pkt, &eth)?,
        (false, true) => icmp_port_unreachable_call(ctx, pkt, &eth)?,
        (false, false) => icmp_port_unreachable(ctx, pkt, &eth)?,
    }
    Ok(ctx.bounce())
}

#[inline(never)]
fn tcp_rst_call<C: PacketCtx>(ctx: &C, pkt: &Packet, eth: &[u8; 12]) -> Result<(), DropReason> {
    tcp_rst(ctx, pkt, eth)
}

#[inline(never)]
fn icmp_port_unreachable_call<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    eth: &[u8; 12],
) -> Result<(), DropReason> {
    icmp_port_unreachable(ctx, pkt, eth)
}

/// A 4-byte aligned buffer, as `bpf_csum_diff` sums 32-bit words.
#[repr(C, align(4))]
struct Words<const N: usize>([u8; N]);

#[inline(always)]
fn tcp_rst<C: PacketCtx>(ctx: &C, pkt: &Packet, eth: &[u8; 12]) -> Result<(), DropReason> {
    let ip = ip_header(pkt, PROTO_TCP, (IP_HLEN + TCP_HLEN) as u16)?;
    let mut t = Words([0u8; TCP_HLEN]);
    let [sp0, sp1] = pkt.dport.to_ne_bytes();
    let [dp0, dp1] = pkt.sport.to_ne_bytes();
    t.0[0] = sp0;
    t.0[1] = sp1;
    t.0[2] = dp0;
    t.0[3] = dp1;
    let (seq, ack, flags) = if pkt.tcp_flags & TCP_FLAG_ACK != 0 {
        (pkt.tcp_ack, 0, TCP_FLAG_RST)
    } else {
        let payload = (pkt.tot_len - pkt.ihl - pkt.tcp_hlen) as u32;
        let syn_fin = u32::from(pkt.tcp_flags & TCP_FLAG_SYN != 0)
            + u32::from(pkt.tcp_flags & TCP_FLAG_FIN != 0);
        (
            0,
            pkt.tcp_seq.wrapping_add(payload).wrapping_add(syn_fin),
            TCP_FLAG_RST | TCP_FLAG_ACK,
        )
    };
    let [s0, s1, s2, s3] = seq.to_be_bytes();
    let [a0, a1, a2, a3] = ack.to_be_bytes();
    t.0[4] = s0;
    t.0[5] = s1;
    t.0[6] = s2;
    t.0[7] = s3;
    t.0[8] = a0;
    t.0[9] = a1;
    t.0[10] = a2;
    t.0[11] = a3;
    t.0[12] = (TCP_HLEN as u8 / 4) << 4;
    t.0[13] = flags;
    // Pseudo header: source, destination, zero, protocol, TCP length.
    let mut pseudo = Words([0u8; 12]);
    pseudo.0[..8].copy_from_slice(&ip.0[12..20]);
    pseudo.0[9] = PROTO_TCP;
    pseudo.0[11] = TCP_HLEN as u8;
    let csum = checksum(&mut t, checksum_seed(&mut pseudo)?)?;
    let [c0, c1] = csum.to_ne_bytes();
    t.0[16] = c0;
    t.0[17] = c1;

    ctx.set_len(RST_LEN as u32)
        .ok_or(DropReason::RejectFailed)?;
    store_eth(ctx, eth)?;
    ctx.store(IPV4_OFF, &ip.0).ok_or(DropReason::RejectFailed)?;
    ctx.store(IPV4_OFF + IP_HLEN, &t.0)
        .ok_or(DropReason::RejectFailed)
}

#[inline(always)]
fn icmp_port_unreachable<C: PacketCtx>(
    ctx: &C,
    pkt: &Packet,
    eth: &[u8; 12],
) -> Result<(), DropReason> {
    // The ICMP message: type, code, checksum, unused, then the quote.
    let quote: [u8; QUOTE_LEN] = ctx.load(IPV4_OFF).ok_or(DropReason::RejectFailed)?;
    let mut icmp = Words([0u8; ICMP_HLEN + QUOTE_LEN]);
    icmp.0[ICMP_HLEN..].copy_from_slice(&quote);
    icmp.0[0] = ICMP_DEST_UNREACH;
    icmp.0[1] = ICMP_PORT_UNREACH;
    let csum = checksum(&mut icmp, 0)?;
    let [c0, c1] = csum.to_ne_bytes();
    icmp.0[2] = c0;
    icmp.0[3] = c1;
    let ip = ip_header(pkt, IPPROTO_ICMP, (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16)?;

    // Every byte is written below (the quote was copied out above).
    ctx.set_len((ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u32)
        .ok_or(DropReason::RejectFailed)?;
    store_eth(ctx, eth)?;
    ctx.store(IPV4_OFF, &ip.0).ok_or(DropReason::RejectFailed)?;
    ctx.store(IPV4_OFF + IP_HLEN, &icmp.0)
        .ok_or(DropReason::RejectFailed)
}

/// Ethernet header with the addresses swapped: back to the sender.
#[inline(always)]
fn store_eth<C: PacketCtx>(ctx: &C, eth: &[u8; 12]) -> Result<(), DropReason> {
    let mut out = [0u8; 14];
    out[..12].copy_from_slice(&swapped_macs(eth));
    out[12] = 0x08;
    ctx.store(0, &out).ok_or(DropReason::RejectFailed)
}

/// A fresh IPv4 header from the service address back to the client.
#[inline(always)]
fn ip_header(pkt: &Packet, proto: u8, tot_len: u16) -> Result<Words<IP_HLEN>, DropReason> {
    let mut ip = Words([0u8; IP_HLEN]);
    let [l0, l1] = tot_len.to_be_bytes();
    let [s0, s1, s2, s3] = pkt.daddr.to_ne_bytes();
    let [d0, d1, d2, d3] = pkt.saddr.to_ne_bytes();
    ip.0 = [
        0x45, 0, l0, l1, 0, 0, 0x40, 0, 64, proto, 0, 0, s0, s1, s2, s3, d0, d1, d2, d3,
    ];
    let csum = checksum(&mut ip, 0)?;
    let [c0, c1] = csum.to_ne_bytes();
    ip.0[10] = c0;
    ip.0[11] = c1;
    Ok(ip)
}

/// The unfolded one's-complement sum of a buffer, to seed another sum.
#[inline(always)]
fn checksum_seed<const N: usize>(buf: &mut Words<N>) -> Result<u32, DropReason> {
    // SAFETY: `buf` is N readable bytes on the stack, N a multiple of 4 (aligned by `Words`).
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.0.as_mut_ptr().cast(),
            N as u32,
            0,
        )
    };
    u32::try_from(sum).map_err(|_| DropReason::RejectFailed)
}

/// The Internet checksum of a buffer plus a seed, ready to store as the buffer's bytes are laid out.
#[inline(always)]
fn checksum<const N: usize>(buf: &mut Words<N>, seed: u32) -> Result<u16, DropReason> {
    // SAFETY: as in `checksum_seed`.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.0.as_mut_ptr().cast(),
            N as u32,
            seed,
        )
    };
    let sum = u32::try_from(sum).map_err(|_| DropReason::RejectFailed)?;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    Ok(!(sum as u16))
}
