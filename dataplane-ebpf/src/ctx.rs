//! The packet access the stages use, whichever hook runs them: a stage takes `&impl PacketCtx`,
//! so parsing and NAT serve TC today and XDP (the node's external interfaces) next.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};

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
    /// The action that sends the packet back out of the interface it came in on.
    fn bounce(&self) -> i32;
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
    fn bounce(&self) -> i32 {
        // SAFETY: `skb` is the program's own context pointer.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    }
}
