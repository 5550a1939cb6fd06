//! The thread team: `threads - 1` workers that spin waiting for the next job, plus the calling
//! thread. A job is a number of parts (rows of every matrix, attention heads); members claim
//! parts one at a time from a shared counter until none are left.
//!
//! Why not rayon: a decode step is ~200 products of a few microseconds each, and waking a
//! sleeping pool thread costs about as much as one of them (binllm-kernels' BENCHMARKS.md
//! measured 2-thread GEMVs slower than 1-thread ones for every SmolLM2 layer). Workers that
//! spin on an atomic counter start a job in well under a microsecond, the way llama.cpp's
//! thread pool does; after ~2 ms without work they park, so an idle model (a chat waiting for
//! the user) costs no CPU. Claiming parts instead of owning them keeps a busy machine from
//! stalling every product on a worker the OS has descheduled: the caller takes its parts.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

type Job = &'static (dyn Fn(usize) + Sync);

/// One value on a cache line of its own (two 64-byte lines: the adjacent-line prefetcher
/// pairs them), so that members spinning on one counter do not take the line from members
/// writing another.
#[repr(align(128))]
struct OwnLine<T>(T);

impl<T> std::ops::Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct JobLine {
    /// Bumped once per job; a worker looks for parts when it sees a new value.
    epoch: AtomicU64,
    /// The job's epoch (high 32 bits) and next unclaimed part (low 32 bits): a part is claimed
    /// by a compare-and-swap that also checks the epoch, so a late worker never claims a part
    /// of the next job with the previous job's closure.
    claim: AtomicU64,
}

struct Shared {
    /// What the caller publishes and members claim from, on one line: a worker that sees a new
    /// epoch has the line for its claim.
    job_line: OwnLine<JobLine>,
    parts: AtomicUsize,
    /// Parts finished in the current job.
    finished: OwnLine<AtomicUsize>,
    job: UnsafeCell<Option<Job>>,
    sleeping: Vec<AtomicBool>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by `Team::run` before it publishes the job's epoch, and read
// by a worker only after it claimed a part of that epoch; `run` returns (and may write the
// next job) only once every part, hence every read, is finished.
unsafe impl Sync for Shared {}

pub struct Team {
    size: usize,
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
}

const SPIN_BEFORE_PARKING: Duration = Duration::from_millis(2);

impl Team {
    /// A team of `size` threads (the caller counts as one; `0`: every core).
    pub fn new(size: usize) -> Result<Self> {
        let size = if size == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            size
        };
        let shared = Arc::new(Shared {
            job_line: OwnLine(JobLine {
                epoch: AtomicU64::new(0),
                claim: AtomicU64::new(0),
            }),
            parts: AtomicUsize::new(0),
            finished: OwnLine(AtomicUsize::new(0)),
            job: UnsafeCell::new(None),
            sleeping: (0..size).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut handles = Vec::new();
        for index in 1..size {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("binllm-{index}"))
                .spawn(move || worker(&shared, index))
                .with_context(|| format!("cannot start thread {index} of {size}"))?;
            handles.push(handle);
        }
        Ok(Team {
            size,
            threads: handles.iter().map(|h| h.thread().clone()).collect(),
            shared,
            handles,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `job(p)` for every part `p` in `0..parts`, spread over the members (the calling
    /// thread included), and returns when all are done.
    pub fn run(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        if self.size == 1 || parts <= 1 {
            (0..parts).for_each(job);
            return;
        }
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: every part is
        // finished, so no worker touches `job` again, before this function returns.
        let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        // SAFETY: no worker reads `job` now: the previous job's parts are all finished and
        // its epoch is still published, so no new claim can succeed.
        unsafe { *s.job.get() = Some(erased) };
        let epoch = s.job_line.epoch.load(Ordering::Relaxed) + 1;
        s.parts.store(parts, Ordering::Relaxed);
        s.finished.store(0, Ordering::Relaxed);
        s.job_line.claim.store(epoch << 32, Ordering::SeqCst);
        s.job_line.epoch.store(epoch, Ordering::SeqCst);
        for (i, thread) in self.threads.iter().enumerate() {
            if s.sleeping[i + 1].load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        let own = catch_unwind(AssertUnwindSafe(|| work(s, epoch)));
        let mut spins = 0u32;
        while s.finished.load(Ordering::Acquire) < parts {
            spins += 1;
            if spins.is_multiple_of(256) {
                // On a busy machine the part still running may be waiting for this core.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(payload) = own {
            std::panic::resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a binllm worker thread panicked");
        }
    }
}

/// Claims and runs parts of job `epoch` until none are left.
fn work(s: &Shared, epoch: u64) {
    let parts = s.parts.load(Ordering::Acquire) as u64;
    let mut current = s.job_line.claim.load(Ordering::Acquire);
    loop {
        if current >> 32 != epoch || current & 0xffff_ffff >= parts {
            return;
        }
        match s.job_line.claim.compare_exchange_weak(
            current,
            current + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // SAFETY: a part of `epoch` is claimed: its job is published and stays valid
                // until this part is counted as finished.
                let job = unsafe { (*s.job.get()).expect("a job is published with every epoch") };
                let part = (current & 0xffff_ffff) as usize;
                if catch_unwind(AssertUnwindSafe(|| job(part))).is_err() {
                    s.panicked.store(true, Ordering::SeqCst);
                }
                s.finished.fetch_add(1, Ordering::Release);
                current = s.job_line.claim.load(Ordering::Acquire);
            }
            Err(actual) => current = actual,
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let epoch = s.job_line.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            std::thread::yield_now();
            if since.elapsed() > SPIN_BEFORE_PARKING {
                // Announce the nap, then look once more: a job published before the flag was
                // seen is found here; one published after finds the flag and unparks.
                s.sleeping[index].store(true, Ordering::SeqCst);
                if s.job_line.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst)
                {
                    std::thread::park_timeout(Duration::from_millis(100));
                }
                s.sleeping[index].store(false, Ordering::SeqCst);
                since = Instant::now();
            }
        }
        work(s, seen);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// An output buffer that team members write disjoint parts of (each its own rows or heads).
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

/// Splits `rows` into `parts` contiguous ranges, each (but the last) a multiple of `align`
/// rows, so that no kernel block straddles two members.
pub fn split_rows(rows: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let per = rows.div_ceil(parts.max(1)).div_ceil(align) * align;
    (0..parts.max(1))
        .map(|i| (i * per).min(rows)..((i + 1) * per).min(rows))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_every_job() {
        let team = Team::new(3).unwrap();
        for round in 0..200 {
            let mut out = vec![0f32; 3];
            let shared = SharedOut::new(&mut out);
            team.run(3, &|i| unsafe {
                shared.slice(i, 1)[0] = (round + i) as f32
            });
            assert_eq!(out, [round as f32, (round + 1) as f32, (round + 2) as f32]);
        }
        // Idle long enough to park, then wake.
        std::thread::sleep(Duration::from_millis(10));
        let count = AtomicUsize::new(0);
        team.run(7, &|_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn rows_split_on_block_boundaries() {
        assert_eq!(split_rows(576, 2, 32), vec![0..288, 288..576]);
        assert_eq!(split_rows(100, 3, 32), vec![0..64, 64..100, 100..100]);
        assert_eq!(split_rows(10, 1, 32), vec![0..10]);
    }
}
