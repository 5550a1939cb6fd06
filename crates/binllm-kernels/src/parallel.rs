//! Splitting output rows across threads.
//!
//! Work runs on the current rayon pool (so a caller can pick one with `pool.install`), split
//! into exactly `min(threads, units)` contiguous ranges; `threads <= 1` runs on the calling
//! thread without touching rayon. Every row is computed by the same code whatever the split,
//! so results do not depend on the thread count.

use std::ops::Range;

/// Calls `work` on disjoint ranges covering `0..units`, at most `threads` of them, in parallel.
pub fn for_each_range(units: usize, threads: usize, work: impl Fn(Range<usize>) + Sync) {
    let parts = threads.clamp(1, units.max(1));
    if parts == 1 {
        work(0..units);
        return;
    }
    let per_part = units.div_ceil(parts);
    let work = &work;
    rayon::scope(|scope| {
        for part in 1..parts {
            let range = (part * per_part).min(units)..((part + 1) * per_part).min(units);
            if !range.is_empty() {
                scope.spawn(move |_| work(range));
            }
        }
        work(0..per_part.min(units));
    });
}

/// An output buffer that tasks working on disjoint index sets write through.
pub struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: `SharedOut` only hands out sub-slices through `slice`, whose contract requires the
// callers' index sets to be disjoint, so concurrent use never aliases.
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

impl SharedOut {
    pub fn new(out: &mut [f32]) -> Self {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// # Safety
    /// No two live slices obtained from the same `SharedOut` may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "SharedOut: out of bounds");
        // SAFETY: in bounds (asserted); disjointness is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}
