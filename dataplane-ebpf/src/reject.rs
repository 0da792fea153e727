//! Active refusal for a service without ready endpoints, as kube-proxy's REJECT rule does: a TCP
//! RST for TCP, an ICMP port unreachable for UDP. The reply is built in place and sent back out of
//! the interface the packet came in on, towards the client pod.

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{DropReason, PROTO_TCP};

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
const ICMP_HEAD_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN;

/// Builds the refusal and redirects it; packets that cannot be answered (an RST, IP options) are
/// dropped, already counted as `NoBackend` by the caller.
#[inline(always)]
pub fn reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, DropReason> {
    if pkt.ihl != IP_HLEN || pkt.tcp_flags & TCP_FLAG_RST != 0 {
        return Ok(TC_ACT_SHOT as i32);
    }
    let eth: [u8; 12] = ctx.load(0).map_err(|_| DropReason::RejectFailed)?;
    if pkt.proto == PROTO_TCP {
        tcp_rst(ctx, pkt, &eth)?;
    } else {
        icmp_port_unreachable(ctx, pkt, &eth)?;
    }
    // SAFETY: `skb` is the program's own context pointer.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; redirecting to the ingress interface's egress side.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

fn tcp_rst(ctx: &TcContext, pkt: &Packet, eth: &[u8; 12]) -> Result<(), DropReason> {
    let mut b = [0u8; RST_LEN];
    ip_header(&mut b, eth, pkt, PROTO_TCP, (IP_HLEN + TCP_HLEN) as u16);
    let t = ETH_HLEN + IP_HLEN;
    b[t..t + 2].copy_from_slice(&pkt.dport.to_ne_bytes());
    b[t + 2..t + 4].copy_from_slice(&pkt.sport.to_ne_bytes());
    if pkt.tcp_flags & TCP_FLAG_ACK != 0 {
        b[t + 4..t + 8].copy_from_slice(&pkt.tcp_ack.to_be_bytes());
        b[t + 13] = TCP_FLAG_RST;
    } else {
        let payload = pkt.tot_len - pkt.ihl - pkt.tcp_hlen;
        let mut ack = pkt.tcp_seq.wrapping_add(payload as u32);
        if pkt.tcp_flags & TCP_FLAG_SYN != 0 {
            ack = ack.wrapping_add(1);
        }
        if pkt.tcp_flags & TCP_FLAG_FIN != 0 {
            ack = ack.wrapping_add(1);
        }
        b[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        b[t + 13] = TCP_FLAG_RST | TCP_FLAG_ACK;
    }
    b[t + 12] = (TCP_HLEN as u8 / 4) << 4;
    // Pseudo header: addresses, zero, protocol, TCP length.
    let mut sum = sum_words(0, &b[IPV4_OFF + 12..IPV4_OFF + 20]);
    sum += u32::from(PROTO_TCP) + TCP_HLEN as u32;
    let csum = fold(sum_words(sum, &b[t..t + TCP_HLEN]));
    b[t + 16..t + 18].copy_from_slice(&csum.to_be_bytes());

    // SAFETY: the context pointer is the program's own.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN as u32, 0) } != 0 {
        return Err(DropReason::RejectFailed);
    }
    ctx.store(0, &b, 0).map_err(|_| DropReason::RejectFailed)
}

fn icmp_port_unreachable(ctx: &TcContext, pkt: &Packet, eth: &[u8; 12]) -> Result<(), DropReason> {
    let quote: [u8; QUOTE_LEN] = ctx.load(IPV4_OFF).map_err(|_| DropReason::RejectFailed)?;
    let mut b = [0u8; ICMP_HEAD_LEN];
    ip_header(
        &mut b,
        eth,
        pkt,
        IPPROTO_ICMP,
        (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16,
    );
    let i = ETH_HLEN + IP_HLEN;
    b[i] = ICMP_DEST_UNREACH;
    b[i + 1] = ICMP_PORT_UNREACH;
    let csum = fold(sum_words(sum_words(0, &b[i..i + ICMP_HLEN]), &quote));
    b[i + 2..i + 4].copy_from_slice(&csum.to_be_bytes());

    let skb: *mut __sk_buff = ctx.skb.skb;
    // Keep Ethernet + the quote, then grow the head so the quote lands right after the new headers.
    // SAFETY: the context pointer is the program's own.
    let resized = unsafe {
        bpf_skb_change_tail(skb, (ETH_HLEN + QUOTE_LEN) as u32, 0) == 0
            && bpf_skb_change_head(skb, (IP_HLEN + ICMP_HLEN) as u32, 0) == 0
    };
    if !resized {
        return Err(DropReason::RejectFailed);
    }
    ctx.store(0, &b, 0).map_err(|_| DropReason::RejectFailed)
}

/// Writes Ethernet (addresses swapped) and a fresh IPv4 header from the service back to the client.
#[inline(always)]
fn ip_header(b: &mut [u8], eth: &[u8; 12], pkt: &Packet, proto: u8, tot_len: u16) {
    b[0..6].copy_from_slice(&eth[6..12]);
    b[6..12].copy_from_slice(&eth[0..6]);
    b[12] = 0x08;
    b[13] = 0x00;
    let ip = &mut b[IPV4_OFF..IPV4_OFF + IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&pkt.daddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&pkt.saddr.to_ne_bytes());
    let csum = fold(sum_words(0, ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// One's-complement sum of big-endian 16-bit words (the slice length is even).
#[inline(always)]
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
