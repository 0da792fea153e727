//! Service lookup and backend choice, from the agent's maps: a frontend's header (slot 0), then a
//! random slot among its backends for a new flow (conntrack pins the flow to it afterwards).
use aya_ebpf::helpers::bpf_get_prandom_u32;
use dataplane_common::{Backend, DropReason, SCOPE_CLUSTER, ServiceKey, ServiceValue};

use crate::maps::{BACKENDS, SERVICES};
use crate::parse::Packet;

/// The service header of the packet's destination, if it is a Service frontend.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(frontend_key(pkt, 0)) }.copied()
}

/// A backend for a new flow to the service of `header` (which has at least one): its id and
/// address. A slot or backend the agent has not written is a drop, never a wrong translation.
#[inline(always)]
pub fn pick(pkt: &Packet, header: &ServiceValue) -> Result<(u32, Backend), DropReason> {
    // SAFETY: helper call without arguments.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(header.count);
    // SAFETY: the value is copied out at once.
    let slot = unsafe { SERVICES.get(frontend_key(pkt, (pick + 1) as u16)) }
        .ok_or(DropReason::BackendMissing)?;
    let backend_id = slot.backend_id;
    // SAFETY: the value is copied out at once.
    let backend = *unsafe { BACKENDS.get(backend_id) }.ok_or(DropReason::BackendMissing)?;
    Ok((backend_id, backend))
}

#[inline(always)]
fn frontend_key(pkt: &Packet, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: SCOPE_CLUSTER,
        slot,
        pad: 0,
    }
}
