//! Service translation on each local pod's host-side interface, on the node's external interfaces,
//! and at the socket for the node's own processes. Entry points only: each calls its hook's pipeline (`path/`) and turns an
//! `Err(DropReason)` into the hook's failure verdict plus a per-CPU drop counter
//! (`counters::verdict`, `counters::sock_verdict`).
//!
//! ```text
//!   pod eth0 ==veth== host side (lxc*)
//!                      |- TC ingress  `from_pod`: path::pod::try_from_pod
//!                      '- TC egress   `to_pod`:   path::pod::try_to_pod
//!   node eth0 (external) |- XDP        `from_external`: path::external::try_from_external
//!                        '- TC egress  `to_external`:   path::external::try_to_external
//!   node cgroup v2     |- connect4, sendmsg4:     path::sock::try_forward
//!                      '- recvmsg4, getpeername4: path::sock::reverse
//! ```
//!
//! Stages, each in its own module and free of any hook's control flow, reach the packet through
//! `ctx::PacketCtx` (implemented for TC and XDP): `parse` (one packet description), `ct` (conntrack), `lb` (service lookup, backend pick), `nat` (rewrite, redirect),
//! `reject` (RST / ICMP unreachable), `icmp` (ICMP errors about translated flows), `csum`, `counters`; `maps` declares every map. Packets the datapath
//! does not handle (non-IPv4, other L4 protocols, IP fragments) pass untouched.
#![no_std]
#![no_main]

mod counters;
mod csum;
mod ct;
mod ctx;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod path;
mod policy;
mod reject;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    counters::verdict(path::pod::try_from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    counters::verdict(path::pod::try_to_pod(&ctx))
}

#[xdp]
pub fn from_external(ctx: XdpContext) -> u32 {
    counters::xdp_verdict(path::external::try_from_external(&ctx))
}

#[classifier]
pub fn to_external(ctx: TcContext) -> i32 {
    counters::verdict(path::external::try_to_external(&ctx))
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    counters::sock_verdict(path::sock::try_forward(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    counters::sock_verdict(path::sock::try_forward(&ctx))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    path::sock::reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    path::sock::reverse(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
