//! Per-CPU counters, and the one place an `Err(DropReason)` becomes a verdict.
use aya_ebpf::bindings::{TC_ACT_SHOT, xdp_action::XDP_DROP};
use dataplane_common::DropReason;

use crate::maps::{DROPS, SVC_STATS};

/// A TC program's verdict: its own on `Ok`, `TC_ACT_SHOT` and a drop counted on `Err`.
#[inline(always)]
pub fn verdict(result: Result<i32, DropReason>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            TC_ACT_SHOT
        }
    }
}

/// An XDP program's verdict: its own on `Ok`, `XDP_DROP` and a drop counted on `Err`.
#[inline(always)]
pub fn xdp_verdict(result: Result<u32, DropReason>) -> u32 {
    match result {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

/// A socket hook's verdict: its own on `Ok`; on `Err` the syscall fails (EPERM) and the reason
/// is counted.
#[inline(always)]
pub fn sock_verdict(result: Result<i32, DropReason>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            count_drop(reason);
            0
        }
    }
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// One flow translated to a backend of the frontend `rev_nat_id`.
#[inline(always)]
pub fn count_flow(rev_nat_id: u16) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(u32::from(rev_nat_id)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*stats).flows += 1 };
    }
}

#[inline(always)]
pub fn count_service(rev_nat_id: u16, bytes: u32) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(u32::from(rev_nat_id)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(bytes);
        }
    }
}
