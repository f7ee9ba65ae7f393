//! A hint that a cache line will be read soon.
//!
//! A batch of heartbeats touches three scattered cache lines each (the
//! index slot, the session, the wheel deadline). Reading them ahead with
//! ordinary loads overlaps only as many misses as the CPU's reorder window
//! holds iterations of the look-ahead loop; a prefetch retires at once, so
//! a whole batch's lines are requested before the first one is needed.

#![allow(unsafe_code)]

/// Asks the CPU to start loading the cache line at `p` into every cache
/// level. Never faults and changes nothing the program can observe, so any
/// address will do; a wrong one only wastes a little bandwidth.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 belongs to SSE, which every x86_64 CPU has; it
    // does not dereference the pointer in the language's sense, cannot
    // fault on any address, and has no effect other than on caches.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
