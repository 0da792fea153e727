//! Socket-level translation for processes in the node's own network namespace (hostNetwork pods,
//! the kubelet, node agents) and, with `--pod-translation socket`, for the node's pods, from
//! cgroup v2 hooks: the Service frontend a socket connects or
//! sends to becomes a backend before any packet exists, and the backend shows as the frontend
//! wherever the socket reports its peer, so established flows pay nothing per packet.
//!
//! ```text
//!  connect4  (TCP, connected UDP)  frontend -> backend, peer recorded in SOCK_REVNAT
//!  sendmsg4  (unconnected UDP)     frontend -> backend, peer recorded in SOCK_REVNAT
//!  recvmsg4  (UDP replies)         backend source -> frontend (resolvers accept the reply)
//!  getpeername4                    backend -> frontend
//! ```
//!
//! Which sockets: those of the node's own network namespace (`NODE` holds its cookie) always;
//! those of other namespaces under the hooks' cgroup (the node's pods) only with
//! `NODE_FLAG_SOCKET_PODS` (`--pod-translation socket`), else they are the TC programs' business.
//! A pod socket to a frontend with `loadBalancerSourceRanges` is left to TC too (the source
//! address is not chosen yet at connect()), and so is one to a frontend without a backend (TC
//! drops or refuses it per packet, exactly as for TC-translated pods), and so is one whose chosen
//! backend is a policy-enforced local pod (a pod reaching itself through a Service is judged on
//! its interface; at the socket it would reach its own address unseen). For node sockets, a
//! frontend with no ready endpoint refuses the connect or send with ECONNREFUSED, as kube-proxy's
//! REJECT makes a client see; one with no local endpoint under `internalTrafficPolicy: Local`
//! fails it with EHOSTUNREACH.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use dataplane_common::{
    DropReason, NODE_FLAG_SOCKET_PODS, PROTO_TCP, PROTO_UDP, SCOPE_CLUSTER, SVC_FLAG_DROP_EMPTY,
    SVC_FLAG_SOURCE_RANGES, SockRevKey, SockRevValue,
};

use crate::counters::{count_drop, count_flow};
use crate::lb::{self, Frontend};
use crate::maps::{NODE, SOCK_REVNAT};
use crate::policy;

/// The hook's verdict: let the syscall proceed.
const PROCEED: i32 = 1;
/// The hook's verdict: fail the syscall (with the errno set by `bpf_set_retval`, EPERM otherwise).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// Whose socket the hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Node,
    Pod,
}

/// The socket's owner, or `None` for a socket the hooks leave alone.
#[inline(always)]
fn owner(ctx: &SockAddrContext) -> Option<Owner> {
    let node = NODE.get(0)?;
    if node.netns_cookie == 0 {
        return None;
    }
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == node.netns_cookie {
        Some(Owner::Node)
    } else if node.flags & NODE_FLAG_SOCKET_PODS != 0 {
        Some(Owner::Pod)
    } else {
        None
    }
}

/// connect4 and sendmsg4: a Service frontend as destination becomes one of its backends.
#[inline(always)]
pub fn try_forward(ctx: &SockAddrContext) -> Result<i32, DropReason> {
    let Some(owner) = owner(ctx) else {
        return Ok(PROCEED);
    };
    // SAFETY: the kernel hands the hook a valid `bpf_sock_addr` for the duration of the run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(PROCEED);
    }
    let frontend = Frontend {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
        scope: SCOPE_CLUSTER,
    };
    let Some(header) = lb::lookup(&frontend) else {
        return Ok(PROCEED);
    };
    if owner == Owner::Pod && (header.count == 0 || header.flags & SVC_FLAG_SOURCE_RANGES != 0) {
        // TC answers these on the pod's interface as kube-proxy does: a drop (no local endpoint),
        // a refusal the client sees as it would from kube-proxy (RST, port unreachable), the
        // source-range check on the address the packet carries.
        return Ok(PROCEED);
    }
    if header.count == 0 {
        // No local endpoint (`internalTrafficPolicy: Local`) is a drop on the packet paths; at
        // the socket there is no packet to drop, and sending the untranslated one would route
        // it off the node, so the syscall fails with EHOSTUNREACH (no refusal was received).
        let (reason, errno) = if header.flags & SVC_FLAG_DROP_EMPTY != 0 {
            (DropReason::NoLocalBackend, EHOSTUNREACH)
        } else {
            (DropReason::NoBackend, ECONNREFUSED)
        };
        count_drop(reason);
        // SAFETY: helper call; connect4 and sendmsg4 may set their return value.
        unsafe { bpf_set_retval(-errno) };
        return Ok(REFUSE);
    }
    let (_, backend) = lb::pick(&frontend, &header)?;
    if owner == Owner::Pod && policy::epoch().is_some() && policy::enforced(backend.addr) {
        // A policy-enforced local backend is TC's: a pod that reaches itself through the
        // Service must be judged, and at the socket its connect would go to its own address
        // without passing an interface.
        return Ok(PROCEED);
    }
    count_flow(header.rev_nat_id);
    let key = SockRevKey {
        // SAFETY: helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: backend.addr,
        port: backend.port,
        pad: 0,
    };
    let peer = SockRevValue {
        addr: frontend.addr,
        port: frontend.port,
        rev_nat_id: header.rev_nat_id,
    };
    SOCK_REVNAT
        .insert(key, peer, 0)
        .map_err(|_| DropReason::SockRevNatFailed)?;
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    Ok(PROCEED)
}

/// recvmsg4 and getpeername4: a translated socket's backend peer shows as the frontend. These
/// hooks cannot fail a syscall; they only ever rewrite.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if owner(ctx).is_none() {
        return PROCEED;
    }
    // SAFETY: as in `try_forward`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey {
        // SAFETY: helper call on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(peer) = unsafe { SOCK_REVNAT.get(key) }.copied() {
        sa.user_ip4 = peer.addr;
        sa.user_port = u32::from(peer.port);
    }
    PROCEED
}
