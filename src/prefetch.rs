//! A hint that a cache line will be read soon.
//!
//! A batch of heartbeats touches three scattered cache lines each (the
//! index slot, the session, the wheel deadline). The engine asks for a
//! whole batch's lines before it needs the first one; a prefetch does not
//! hold the CPU up until its line arrives, as a load does. Measured
//! against the plain loads it replaced in docs/benchmarks-history.md
//! ("Prefetching the batch").
//!
//! Only x86_64 has it here (its prefetch is stable in `core::arch`;
//! aarch64's is not). Elsewhere [`prefetch`] reads the value instead and
//! [`prefetch_address`] does nothing: the engine then keeps the look-ahead
//! of loads it had before (not measured on another architecture).

#![allow(unsafe_code)]

/// Starts loading the cache line that holds `value`.
#[inline(always)]
pub(crate) fn prefetch<T: Copy>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    prefetch_address(value);
    #[cfg(not(target_arch = "x86_64"))]
    std::hint::black_box(*value);
}

/// Asks the CPU to start loading the cache line at `address`. Never
/// faults and changes nothing the program can observe, so any address
/// will do: a wrong one only wastes a line's worth of bandwidth.
#[inline(always)]
pub(crate) fn prefetch_address<T>(address: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 belongs to SSE, which every x86_64 CPU has; it
    // does not dereference the pointer in the language's sense, cannot
    // fault on any address, and has no effect other than on caches.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}
