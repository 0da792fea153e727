//! ICMP errors about translated flows (port unreachable, fragmentation needed, time exceeded):
//! the error quotes the packet as the far end saw it (the backend's address, or the node's source
//! NAT port); the quoted header and the error's own addresses are translated back so the client's
//! stack matches it to the socket that used the Service address.
//!
//! ```text
//!  eth | IPv4 (outer: router or backend -> client) | ICMP type, code, csum | quoted IPv4 | 8 bytes of L4
//! ```
//! The ICMP checksum covers the quote, so every rewritten word of it (addresses, ports, the
//! quoted header's checksum) is folded into it; the quoted L4 checksum is left as it is (no
//! stack checks it, and a quote may be cut short).
use dataplane_common::{CT_DIR_REPLY, CtKey, DropReason, PROTO_TCP, PROTO_UDP};

use crate::csum::{csum_replace2, csum_replace4};
use crate::ctx::PacketCtx;
use crate::parse::{ETH_HLEN, IPV4_OFF, header_mut};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ETH_P_IP: u16 = 0x0800;

/// An ICMP error about a TCP or UDP packet. Addresses and ports in network byte order.
pub struct IcmpError {
    pub outer_saddr: u32,
    icmp_off: usize,
    inner_off: usize,
    pub proto: u8,
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
}

/// The rewrite of one error: `None` leaves a field alone.
pub struct Rewrite {
    pub outer_saddr: Option<u32>,
    pub outer_daddr: Option<u32>,
    pub inner_src: Option<(u32, u16)>,
    pub inner_dst: Option<(u32, u16)>,
}

impl IcmpError {
    /// The error in this frame, if it is one (IPv4 without options, not a fragment, a
    /// destination-unreachable or time-exceeded quoting TCP or UDP with its ports).
    #[inline(always)]
    pub fn parse<C: PacketCtx>(ctx: &C) -> Option<IcmpError> {
        let icmp_off = IPV4_OFF + 20;
        let inner_off = icmp_off + 8;
        let head: [u8; 2] = ctx.load(12)?;
        let proto: u8 = ctx.load(IPV4_OFF + 9)?;
        if u16::from_be_bytes(head) != ETH_P_IP || proto != PROTO_ICMP {
            return None;
        }
        ctx.pull((inner_off + 24) as u32)?;
        let eth = header_mut::<ETH_HLEN, C>(ctx, 0)?;
        let outer = header_mut::<20, C>(ctx, IPV4_OFF)?;
        let icmp = header_mut::<8, C>(ctx, icmp_off)?;
        let inner = header_mut::<24, C>(ctx, inner_off)?;
        // SAFETY: in bounds (checked by `header_mut`), read before any write or helper call.
        let (eth, outer, icmp, inner) = unsafe { (&*eth, &*outer, &*icmp, &*inner) };
        let fragment = u16::from_be_bytes([outer[6], outer[7]]) & 0x3fff != 0;
        if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP
            || outer[0] != 0x45
            || outer[9] != PROTO_ICMP
            || fragment
            || !(icmp[0] == ICMP_DEST_UNREACH || icmp[0] == ICMP_TIME_EXCEEDED)
            || inner[0] != 0x45
            || !(inner[9] == PROTO_TCP || inner[9] == PROTO_UDP)
        {
            return None;
        }
        let word =
            |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Some(IcmpError {
            outer_saddr: word(outer, 12),
            icmp_off,
            inner_off,
            proto: inner[9],
            inner_saddr: word(inner, 12),
            inner_daddr: word(inner, 16),
            inner_sport: u16::from_ne_bytes([inner[20], inner[21]]),
            inner_dport: u16::from_ne_bytes([inner[22], inner[23]]),
        })
    }

    /// The conntrack key of the flow the quote belongs to, in its reply direction: the quoted
    /// packet went from the client's side to the far end, so its reply comes from the far end.
    #[inline(always)]
    pub fn reply_key(&self) -> CtKey {
        CtKey {
            saddr: self.inner_daddr,
            daddr: self.inner_saddr,
            sport: self.inner_dport,
            dport: self.inner_sport,
            proto: self.proto,
            dir: CT_DIR_REPLY,
            pad: 0,
        }
    }

    /// Applies `rw` in place, with every checksum kept right.
    #[inline(always)]
    pub fn rewrite<C: PacketCtx>(&self, ctx: &C, rw: &Rewrite) -> Result<(), DropReason> {
        let outer = header_mut::<20, C>(ctx, IPV4_OFF).ok_or(DropReason::NatFailed)?;
        let icmp = header_mut::<8, C>(ctx, self.icmp_off).ok_or(DropReason::NatFailed)?;
        let inner = header_mut::<24, C>(ctx, self.inner_off).ok_or(DropReason::NatFailed)?;
        // SAFETY: in bounds (checked by `header_mut`), three disjoint ranges, no helper call
        // until this function returns.
        let (outer, icmp, inner) = unsafe { (&mut *outer, &mut *icmp, &mut *inner) };
        if let Some(new) = rw.outer_saddr {
            outer_addr::<12>(outer, new);
        }
        if let Some(new) = rw.outer_daddr {
            outer_addr::<16>(outer, new);
        }
        let mut icmp_csum = u16::from_ne_bytes([icmp[2], icmp[3]]);
        if let Some((addr, port)) = rw.inner_src {
            icmp_csum = quoted_endpoint::<12, 20>(inner, icmp_csum, addr, port);
        }
        if let Some((addr, port)) = rw.inner_dst {
            icmp_csum = quoted_endpoint::<16, 22>(inner, icmp_csum, addr, port);
        }
        let [c0, c1] = icmp_csum.to_ne_bytes();
        icmp[2] = c0;
        icmp[3] = c1;
        Ok(())
    }
}

/// Rewrites the outer header's address at `AT` (12: source, 16: destination).
#[inline(always)]
fn outer_addr<const AT: usize>(ip: &mut [u8; 20], new: u32) {
    let old = set4::<AT, 20>(ip, new);
    let csum = csum_replace4(u16::from_ne_bytes([ip[10], ip[11]]), old, new);
    let [c0, c1] = csum.to_ne_bytes();
    ip[10] = c0;
    ip[11] = c1;
}

/// Rewrites the quote's address at `ADDR` and port at `PORT`, fixing the quoted header's
/// checksum; returns the ICMP checksum with every changed word folded in.
#[inline(always)]
fn quoted_endpoint<const ADDR: usize, const PORT: usize>(
    q: &mut [u8; 24],
    icmp_csum: u16,
    addr: u32,
    port: u16,
) -> u16 {
    let old = set4::<ADDR, 24>(q, addr);
    let ip_csum = u16::from_ne_bytes([q[10], q[11]]);
    let new_ip_csum = csum_replace4(ip_csum, old, addr);
    let [c0, c1] = new_ip_csum.to_ne_bytes();
    q[10] = c0;
    q[11] = c1;
    let old_port = u16::from_ne_bytes([q[PORT], q[PORT + 1]]);
    let [p0, p1] = port.to_ne_bytes();
    q[PORT] = p0;
    q[PORT + 1] = p1;
    let c = csum_replace4(icmp_csum, old, addr);
    let c = csum_replace2(c, ip_csum, new_ip_csum);
    csum_replace2(c, old_port, port)
}

/// Writes a 32-bit word at `AT`; returns the old one. Constant offsets into fixed arrays: no
/// bounds check is left for the verifier to reject.
#[inline(always)]
fn set4<const AT: usize, const N: usize>(b: &mut [u8; N], new: u32) -> u32 {
    let old = u32::from_ne_bytes([b[AT], b[AT + 1], b[AT + 2], b[AT + 3]]);
    let [n0, n1, n2, n3] = new.to_ne_bytes();
    b[AT] = n0;
    b[AT + 1] = n1;
    b[AT + 2] = n2;
    b[AT + 3] = n3;
    old
}
