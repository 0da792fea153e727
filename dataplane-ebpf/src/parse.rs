//! Packet parsing: Ethernet -> IPv4 (any header length) -> TCP/UDP ports.

use dataplane_common::{CtKey, DropReason, PROTO_TCP, PROTO_UDP};

use crate::ctx::PacketCtx;

pub const ETH_HLEN: usize = 14;
pub const IPV4_OFF: usize = ETH_HLEN;
const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The fields of one IPv4 TCP/UDP packet the pipeline works on. Addresses and ports are kept in
/// network byte order, as on the wire.
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 header length in bytes (20..=60).
    pub ihl: usize,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// IPv4 total length (header and payload), host byte order.
    pub tot_len: usize,
    /// TCP only: flags, header length in bytes, sequence and acknowledgement numbers (host order).
    pub tcp_flags: u8,
    pub tcp_hlen: usize,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
}

impl Packet {
    /// `Ok(None)` for packets the datapath leaves alone (not IPv4, not TCP/UDP, IP fragments);
    /// `Err(Malformed)` for IPv4 packets whose headers are truncated or inconsistent.
    ///
    /// Headers are read in place (direct packet access): no helper call when they sit in the
    /// linear part of the buffer, as a local pod's packets' headers do. A header that does not is
    /// pulled in first; nothing past the headers is (payload pulled into the linear part would
    /// cost a copy of the head of every cloned packet, and TCP sends clones).
    #[inline(always)]
    pub fn parse<C: PacketCtx>(ctx: &C) -> Result<Option<Packet>, DropReason> {
        let frame_len = ctx.len() as usize;
        let Some(eth) = header::<ETH_HLEN, C>(ctx, 0) else {
            return Ok(None);
        };
        if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
            return Ok(None);
        }
        let ip = header::<20, C>(ctx, IPV4_OFF).ok_or(DropReason::Malformed)?;
        if ip[0] >> 4 != 4 {
            return Err(DropReason::Malformed);
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ihl < 20 || tot_len < ihl || IPV4_OFF + tot_len > frame_len {
            return Err(DropReason::Malformed);
        }
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
            return Ok(None);
        }
        let proto = ip[9];
        let l4_off = IPV4_OFF + ihl;
        let l4_len = tot_len - ihl;
        let mut pkt = Packet {
            saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
            daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
            sport: 0,
            dport: 0,
            proto,
            ihl,
            l4_off,
            tot_len,
            tcp_flags: 0,
            tcp_hlen: 0,
            tcp_seq: 0,
            tcp_ack: 0,
        };
        match proto {
            PROTO_TCP => {
                if l4_len < 20 {
                    return Err(DropReason::Malformed);
                }
                let tcp = header::<14, C>(ctx, l4_off).ok_or(DropReason::Malformed)?;
                let hlen = usize::from(tcp[12] >> 4) * 4;
                if hlen < 20 || hlen > l4_len {
                    return Err(DropReason::Malformed);
                }
                pkt.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
                pkt.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
                pkt.tcp_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
                pkt.tcp_ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
                pkt.tcp_hlen = hlen;
                pkt.tcp_flags = tcp[13];
            }
            PROTO_UDP => {
                if l4_len < 8 {
                    return Err(DropReason::Malformed);
                }
                let udp = header::<4, C>(ctx, l4_off).ok_or(DropReason::Malformed)?;
                pkt.sport = u16::from_ne_bytes([udp[0], udp[1]]);
                pkt.dport = u16::from_ne_bytes([udp[2], udp[3]]);
            }
            _ => return Ok(None),
        }
        Ok(Some(pkt))
    }

    /// The packet's 5-tuple as a conntrack key for one direction.
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            pad: 0,
        }
    }

    /// A TCP segment that opens a connection: SYN without ACK.
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// The `N` bytes at `off`, read in place. When they lie past the linear part of the buffer but
/// within the packet, the packet is pulled up to their end first (this invalidates earlier header
/// references). `None` when the packet is shorter, or the pull failed.
#[inline(always)]
fn header<const N: usize, C: PacketCtx>(ctx: &C, off: usize) -> Option<&[u8; N]> {
    let p = match header_mut(ctx, off) {
        Some(p) => p,
        None => {
            if off + N > ctx.len() as usize || ctx.pull((off + N) as u32).is_none() {
                return None;
            }
            header_mut(ctx, off)?
        }
    };
    // SAFETY: read only while this borrow of the context lasts, in which nothing writes the packet.
    Some(unsafe { &*p })
}

/// A pointer to the `N` bytes at `off` in the linear part of the packet; `None` past its end. Valid
/// until the next helper call that may move the packet (checksum, store, pull helpers).
#[inline(always)]
pub fn header_mut<const N: usize, C: PacketCtx>(ctx: &C, off: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data() + off;
    if start + N > ctx.data_end() {
        return None;
    }
    // The check above is the bounds check the verifier requires for direct packet access.
    Some(start as *mut [u8; N])
}
