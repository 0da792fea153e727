//! Service lookup and backend choice, from the agent's maps: a frontend's header (slot 0), then a
//! random slot among its backends for a new flow (conntrack, or the socket, pins the flow to it
//! afterwards). Any hook calls these with the frontend it sees: a packet's destination, or the
//! address a socket connects or sends to.
use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use dataplane_common::{
    Backend, DropReason, SCOPE_CLUSTER, SOURCE_RANGE_ID_BITS, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue, SourceRangeKey,
};

use crate::maps::{BACKENDS, SERVICES, SOURCE_RANGES};
use crate::parse::Packet;

/// A destination that may be a Service frontend, as one scope of clients sees it (`SCOPE_*`);
/// address and port in network byte order.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl Frontend {
    /// A packet's destination, for a client in the cluster.
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Frontend {
        Self::scoped(pkt, SCOPE_CLUSTER)
    }

    /// A packet's destination, for clients of `scope`.
    #[inline(always)]
    pub fn scoped(pkt: &Packet, scope: u8) -> Frontend {
        Frontend {
            addr: pkt.daddr,
            port: pkt.dport,
            proto: pkt.proto,
            scope,
        }
    }
}

/// The service header of a destination, if it is a Service frontend.
#[inline(always)]
pub fn lookup(fe: &Frontend) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(frontend_key(fe, 0)) }.copied()
}

/// A backend for a new flow to the service of `header` (which has at least one): its id and
/// address. A slot or backend the agent has not written is a drop, never a wrong translation.
#[inline(always)]
pub fn pick(fe: &Frontend, header: &ServiceValue) -> Result<(u32, Backend), DropReason> {
    // SAFETY: helper call without arguments.
    let pick = unsafe { bpf_get_prandom_u32() }
        .checked_rem(u32::from(header.count))
        .ok_or(DropReason::BackendMissing)?;
    // SAFETY: the value is copied out at once.
    let slot = unsafe { SERVICES.get(frontend_key(fe, (pick + 1) as u16)) }
        .ok_or(DropReason::BackendMissing)?;
    let backend_id = slot.backend_id;
    // SAFETY: the value is copied out at once.
    let backend = *unsafe { BACKENDS.get(backend_id) }.ok_or(DropReason::BackendMissing)?;
    Ok((backend_id, backend))
}

/// `loadBalancerSourceRanges`: a frontend with ranges admits only clients inside one of them.
#[inline(always)]
pub fn admit(header: &ServiceValue, saddr: u32) -> Result<(), DropReason> {
    if header.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return Ok(());
    }
    let key = Key::new(
        SOURCE_RANGE_ID_BITS + 32,
        SourceRangeKey {
            rev_nat_id: header.rev_nat_id,
            pad: 0,
            addr: saddr,
        },
    );
    SOURCE_RANGES
        .get(key)
        .map(drop)
        .ok_or(DropReason::SourceRange)
}

#[inline(always)]
fn frontend_key(fe: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: fe.addr,
        port: fe.port,
        proto: fe.proto,
        scope: fe.scope,
        slot,
        pad: 0,
    }
}
