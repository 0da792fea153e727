//! The packet access the stages use, whichever hook runs them: a stage takes `&impl PacketCtx`,
//! so parsing and NAT serve TC (pod interfaces) and XDP (the node's external interfaces) alike.
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_TX},
    },
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};

use crate::csum::{csum_replace2, csum_replace4};

pub trait PacketCtx {
    /// Start and end of the linear (directly readable) part of the packet.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet, linear part or not.
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear; `None` if that fails. Invalidates header pointers.
    fn pull(&self, len: u32) -> Option<()>;
    /// A copy of the `T` at `off`.
    fn load<T>(&self, off: usize) -> Option<T>;
    /// Writes `v` at `off`. Invalidates header pointers.
    fn store<T>(&self, off: usize, v: &T) -> Option<()>;
    /// Updates the L4 checksum at `off` for a `from` -> `to` change (`flags` as for
    /// `bpf_l4_csum_replace`: size, pseudo-header, mangled-zero). Invalidates header pointers.
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Option<()>;
    /// Makes the packet `len` bytes long; where it grew, its bytes are undefined (the caller
    /// writes all of them). `None` if that fails. Invalidates header pointers.
    fn set_len(&self, len: u32) -> Option<()>;
    /// The action that sends the packet back out of the interface it came in on.
    fn bounce(&self) -> i32;
    /// The action that drops the packet.
    fn drop_action(&self) -> i32;
}

impl PacketCtx for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> Option<()> {
        self.pull_data(len).ok().map(drop)
    }

    #[inline(always)]
    fn load<T>(&self, off: usize) -> Option<T> {
        TcContext::load(self, off).ok()
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Option<()> {
        TcContext::store(self, off, v, 0).ok()
    }

    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Option<()> {
        TcContext::l4_csum_replace(self, off, from, to, flags).ok()
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> Option<()> {
        // SAFETY: the context pointer is the program's own.
        (unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) } == 0).then_some(())
    }

    #[inline(always)]
    fn drop_action(&self) -> i32 {
        TC_ACT_SHOT
    }

    #[inline(always)]
    fn bounce(&self) -> i32 {
        // SAFETY: `skb` is the program's own context pointer.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }
}

/// XDP sees the frame in one linear buffer (multi-buffer frames are not enabled), so every access
/// is a bounds-checked pointer into it and checksums are updated by hand.
impl PacketCtx for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> Option<()> {
        (self.data() + len as usize <= self.data_end()).then_some(())
    }

    #[inline(always)]
    fn load<T>(&self, off: usize) -> Option<T> {
        let p = self.data() + off;
        if p + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: in bounds (checked above, the check the verifier needs); unaligned read.
        Some(unsafe { core::ptr::read_unaligned(p as *const T) })
    }

    #[inline(always)]
    fn store<T>(&self, off: usize, v: &T) -> Option<()> {
        let p = self.data() + off;
        if p + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: in bounds (checked above); unaligned write of a plain value.
        unsafe { core::ptr::write_unaligned(p as *mut T, core::ptr::read(v)) };
        Some(())
    }

    /// As `bpf_l4_csum_replace` on a complete checksum (what a NIC or the lab's veths hand XDP):
    /// the pseudo-header flag changes nothing here, and a UDP checksum of 0 (none) stays 0.
    #[inline(always)]
    fn l4_csum_replace(&self, off: usize, from: u64, to: u64, flags: u64) -> Option<()> {
        let old: u16 = self.load(off)?;
        let mangled_0 = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        if mangled_0 && old == 0 {
            return Some(());
        }
        let mut new = if flags & 0xf == 4 {
            csum_replace4(old, from as u32, to as u32)
        } else {
            csum_replace2(old, from as u16, to as u16)
        };
        if mangled_0 && new == 0 {
            new = 0xffff;
        }
        self.store(off, &new)
    }

    /// Shrinks at the tail, grows at the head: XDP always has 256 bytes of headroom, tailroom
    /// depends on the driver.
    #[inline(always)]
    fn set_len(&self, len: u32) -> Option<()> {
        let delta = len as i32 - PacketCtx::len(self) as i32;
        // SAFETY: the context pointer is the program's own.
        let rc = unsafe {
            if delta <= 0 {
                bpf_xdp_adjust_tail(self.ctx, delta)
            } else {
                bpf_xdp_adjust_head(self.ctx, -delta)
            }
        };
        (rc == 0).then_some(())
    }

    #[inline(always)]
    fn bounce(&self) -> i32 {
        XDP_TX as i32
    }

    #[inline(always)]
    fn drop_action(&self) -> i32 {
        XDP_DROP as i32
    }
}
