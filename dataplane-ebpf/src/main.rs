//! Service translation on each local pod's host-side interface. Entry points only: each calls its
//! hook's `try_*` pipeline (`path/`) and turns an `Err(DropReason)` into `TC_ACT_SHOT` plus a
//! per-CPU drop counter (`counters::verdict`).
//!
//! ```text
//!   pod eth0 ==veth== host side (lxc*)
//!                      |- TC ingress  `from_pod`: path::pod::try_from_pod
//!                      '- TC egress   `to_pod`:   path::pod::try_to_pod
//! ```
//!
//! Stages, each in its own module and free of any hook's control flow, reach the packet through
//! `ctx::PacketCtx` (implemented for TC; XDP next): `parse` (one packet description), `ct` (conntrack), `lb` (service lookup, backend pick), `nat` (rewrite, redirect),
//! `reject` (RST / ICMP unreachable), `counters`; `maps` declares every map. Packets the datapath
//! does not handle (non-IPv4, other L4 protocols, IP fragments) pass untouched.
#![no_std]
#![no_main]

mod counters;
mod ct;
mod ctx;
mod lb;
mod maps;
mod nat;
mod parse;
mod path;
mod reject;

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    counters::verdict(path::pod::try_from_pod(&ctx))
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    counters::verdict(path::pod::try_to_pod(&ctx))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
