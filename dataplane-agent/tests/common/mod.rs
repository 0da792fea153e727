//! Packet building and checking for the BPF_PROG_TEST_RUN tests.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A test packet, built field by field; `build` computes lengths and checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ip_options: Vec<u8>,
    pub frag: u16,
    pub payload: Vec<u8>,
    /// UDP only: send a zero checksum ("no checksum").
    pub udp_zero_csum: bool,
}

impl Pkt {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            proto: TCP,
            tcp_flags: flags,
            seq: 1000,
            ack: 0,
            ip_options: Vec::new(),
            frag: 0x4000,
            payload: Vec::new(),
            udp_zero_csum: false,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            proto: UDP,
            tcp_flags: 0,
            payload: b"ping".to_vec(),
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(self.sport.to_be_bytes());
        l4.extend(self.dport.to_be_bytes());
        if self.proto == TCP {
            l4.extend(self.seq.to_be_bytes());
            l4.extend(self.ack.to_be_bytes());
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend(64240u16.to_be_bytes());
            l4.extend([0, 0, 0, 0]);
        } else {
            l4.extend(((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend([0, 0]);
        }
        l4.extend(&self.payload);
        let csum_at = if self.proto == TCP { 16 } else { 6 };
        if !(self.proto == UDP && self.udp_zero_csum) {
            let mut c = l4_checksum(self.src, self.dst, self.proto, &l4);
            if self.proto == UDP && c == 0 {
                c = 0xffff;
            }
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        let mut ip_opts = self.ip_options.clone();
        while !ip_opts.len().is_multiple_of(4) {
            ip_opts.push(0);
        }
        let ihl = 5 + ip_opts.len() / 4;
        let tot_len = ihl * 4 + l4.len();
        let mut ip = vec![(4 << 4) | ihl as u8, 0];
        ip.extend((tot_len as u16).to_be_bytes());
        ip.extend([0x12, 0x34]);
        ip.extend(self.frag.to_be_bytes());
        ip.extend([64, self.proto, 0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(&ip_opts);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut frame = Vec::new();
        frame.extend(HOST_MAC);
        frame.extend(CLIENT_MAC);
        frame.extend([0x08, 0x00]);
        frame.extend(ip);
        frame.extend(l4);
        frame
    }
}

pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, proto]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    pseudo.extend(l4);
    checksum(&pseudo)
}

/// A parsed output frame, with its checksums verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    /// The ICMP type/code and the quoted IPv4 header + 8 bytes, for ICMP errors.
    pub icmp: Option<(u8, u8, Vec<u8>)>,
    pub udp_csum: u16,
}

/// Parses an Ethernet/IPv4 frame and asserts both checksums are right.
pub fn parse_checked(frame: &[u8]) -> Parsed {
    assert!(frame.len() >= 34, "frame too short: {} bytes", frame.len());
    assert_eq!(&frame[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(
        tot_len,
        ip.len(),
        "IPv4 total length does not match the frame"
    );
    assert_eq!(checksum(&ip[..ihl]), 0, "bad IPv4 header checksum");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..tot_len];
    let mut out = Parsed {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        eth_dst: frame[0..6].try_into().unwrap(),
        eth_src: frame[6..12].try_into().unwrap(),
        icmp: None,
        udp_csum: 0,
    };
    match proto {
        1 => {
            assert_eq!(checksum(l4), 0, "bad ICMP checksum");
            out.icmp = Some((l4[0], l4[1], l4[8..].to_vec()));
        }
        _ => {
            out.sport = u16::from_be_bytes([l4[0], l4[1]]);
            out.dport = u16::from_be_bytes([l4[2], l4[3]]);
            if proto == TCP {
                out.seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
                out.ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
                out.tcp_flags = l4[13];
                assert_eq!(l4_checksum(src, dst, proto, l4), 0, "bad TCP checksum");
            } else {
                out.udp_csum = u16::from_be_bytes([l4[6], l4[7]]);
                if out.udp_csum != 0 {
                    assert_eq!(l4_checksum(src, dst, proto, l4), 0, "bad UDP checksum");
                }
            }
        }
    }
    out
}
