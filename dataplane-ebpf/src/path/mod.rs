//! One `try_*` pipeline per hook; each returns the verdict its entry point turns into an action.
pub mod external;
pub mod pod;
pub mod sock;

use dataplane_common::{CT_FLAG_HAIRPIN, DropReason};

use crate::ct;
use crate::ctx::PacketCtx;
use crate::icmp::{IcmpError, Rewrite};

/// An ICMP error towards a client (from its backend, or a router on the way) about a connection
/// translated here without source NAT: the quote's destination becomes the frontend again, and
/// so does the error's source when the backend sent it. Anything else passes as it is.
#[inline(always)]
pub fn reverse_icmp_error<C: PacketCtx>(ctx: &C) -> Result<(), DropReason> {
    let Some(err) = IcmpError::parse(ctx) else {
        return Ok(());
    };
    let Some(ct) = ct::lookup(err.reply_key()) else {
        return Ok(());
    };
    if ct.flags & CT_FLAG_HAIRPIN != 0 {
        return Ok(());
    }
    err.rewrite(
        ctx,
        &Rewrite {
            outer_saddr: (err.outer_saddr == err.inner_daddr).then_some(ct.nat_addr),
            outer_daddr: None,
            inner_src: None,
            inner_dst: Some((ct.nat_addr, ct.nat_port)),
        },
    )
}
