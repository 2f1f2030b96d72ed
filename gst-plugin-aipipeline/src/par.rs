// SPDX-License-Identifier: MPL-2.0
//! Row-parallel loops for the per-pixel conversions, run on torch's own CPU threads.
//!
//! libtorch's CPU kernels run on an OpenMP team (GNU libgomp, `libgomp.so.1` beside
//! `libtorch_cpu.so`): `at::parallel_for` is an `omp parallel` region. The conversions before
//! and after a forward use the same team, through libgomp's entry point for a parallel region
//! (`GOMP_parallel`, what a compiler emits for `#pragma omp parallel`), found in the copy of
//! libgomp torch has already loaded: no threads of our own competing with torch's for the
//! cores, no extra threads at all, and the split follows `RIVULET_TORCH_THREADS`.
//!
//! The rows are cut into several chunks per thread, taken in turn from a shared counter: the
//! calling thread starts at once and a team thread that is still asleep (before a forward the
//! team has usually gone to sleep) joins when it wakes, instead of the caller waiting for it
//! with half the rows reserved for it. (A fixed half each made the input conversion slower
//! than doing it alone; the `aipipeline` bench compares the element with and without these
//! loops in one run.)
//!
//! Where no libgomp is loaded (a libtorch built with another threading runtime), torch runs
//! one thread, or the work is small, the loop runs on the calling thread: same results, as
//! each chunk is processed exactly as the whole would be.

use std::ffi::{c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

/// Below this many bytes touched (read + written) a loop stays on the calling thread: waking
/// the team costs more than it saves (a 512×512 RGB conversion touches about 4 MB).
pub const MIN_PARALLEL_BYTES: usize = 256 * 1024;

/// Chunks per thread (see the module text).
const CHUNKS_PER_THREAD: usize = 8;

/// libgomp's `void GOMP_parallel (void (*fn) (void *), void *data, unsigned num_threads,
/// unsigned flags)`.
type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// libgomp's parallel-region entry point, from the copy already in the process.
static GOMP_PARALLEL: LazyLock<Option<ParallelFn>> = LazyLock::new(|| {
    // SAFETY: RTLD_NOLOAD only looks up a library already loaded (torch's dependency); the
    // symbol is libgomp's public ABI with the C signature of `ParallelFn`. The handle is never
    // closed, so the function stays valid for the life of the process.
    unsafe {
        let lib = libc::dlopen(
            c"libgomp.so.1".as_ptr(),
            libc::RTLD_LAZY | libc::RTLD_NOLOAD,
        );
        if lib.is_null() {
            return None;
        }
        let f = libc::dlsym(lib, c"GOMP_parallel".as_ptr());
        (!f.is_null()).then(|| std::mem::transmute::<*mut c_void, ParallelFn>(f))
    }
});

/// Off: every loop runs on its calling thread (the benches compare both in one run).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether the loops can run on torch's team (libgomp found in the process).
pub fn available() -> bool {
    GOMP_PARALLEL.is_some()
}

/// Turns the parallel loops on (the default) or off, for the whole process (for the benches'
/// comparison).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// What one parallel region runs: `task(i)` for every i in 0..tasks, each i taken once, by
/// whichever thread gets to it.
struct Region<'a> {
    tasks: usize,
    next: AtomicUsize,
    task: &'a (dyn Fn(usize) + Sync),
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

extern "C" fn region_body(data: *mut c_void) {
    // SAFETY: `data` is the `&Region` passed to GOMP_parallel by `run_tasks`, which outlives
    // the region (GOMP_parallel returns only after every thread has left this function).
    let r = unsafe { &*(data as *const Region<'_>) };
    // A panic must not unwind into C: it is kept and raised again on the calling thread.
    let run = catch_unwind(AssertUnwindSafe(|| {
        loop {
            let i = r.next.fetch_add(1, Ordering::Relaxed);
            if i >= r.tasks {
                break;
            }
            (r.task)(i);
        }
    }));
    if let Err(p) = run
        && let Ok(mut slot) = r.panic.lock()
    {
        slot.get_or_insert(p);
    }
}

/// Runs `task(i)` for every i in 0..tasks on a team of `threads` (the calling thread
/// included), or on the calling thread alone when there is no team.
fn run_tasks(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let Some(parallel) = GOMP_PARALLEL.filter(|_| threads > 1 && tasks > 1) else {
        (0..tasks).for_each(task);
        return;
    };
    let region = Region {
        tasks,
        next: AtomicUsize::new(0),
        task,
        panic: Mutex::new(None),
    };
    // SAFETY: `region_body` matches the callback type and reads `region` only while this
    // call runs (GOMP_parallel joins the team before returning); flags 0 = default binding.
    unsafe {
        parallel(
            region_body,
            &region as *const Region<'_> as *mut c_void,
            threads as c_uint,
            0,
        )
    };
    if let Some(p) = region.panic.into_inner().ok().flatten() {
        resume_unwind(p);
    }
}

/// How many threads a loop touching `bytes` bytes uses: torch's thread count, or 1 when the
/// work is small, there is no team or the loops are off.
pub fn threads_for(bytes: usize) -> usize {
    if bytes < MIN_PARALLEL_BYTES || !available() || !ENABLED.load(Ordering::Relaxed) {
        return 1;
    }
    tch::get_num_threads().max(1) as usize
}

/// Splits `dst` into runs of whole rows of `row_len` elements (the last row may be shorter,
/// as the last row of a strided plane is) and calls `f(first_row, rows)` on each run, on
/// torch's threads when the work (`bytes` touched in all) is worth it. Every row is passed
/// exactly once, so the result is the same as `f(0, dst)`.
pub fn for_row_chunks<T: Send>(
    dst: &mut [T],
    row_len: usize,
    bytes: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let row_len = row_len.max(1);
    let rows = dst.len().div_ceil(row_len);
    let threads = threads_for(bytes).min(rows);
    if threads <= 1 {
        f(0, dst);
        return;
    }
    let per = rows.div_ceil(threads * CHUNKS_PER_THREAD);
    // Each chunk is taken by exactly one task; the locks are never contended.
    let chunks: Vec<Mutex<Option<&mut [T]>>> = dst
        .chunks_mut(per * row_len)
        .map(|c| Mutex::new(Some(c)))
        .collect();
    run_tasks(threads, chunks.len(), &|i| {
        let chunk = chunks[i].lock().ok().and_then(|mut c| c.take());
        if let Some(chunk) = chunk {
            f(i * per, chunk);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_in_order_of_position() {
        // Force a team: torch's threads are initialised by any op.
        let _ = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
        for (rows, row_len, tail) in [(7usize, 5usize, 0usize), (512, 3, 2), (1, 9, 0)] {
            let len = rows * row_len - tail;
            let mut v = vec![0usize; len];
            for_row_chunks(&mut v, row_len, usize::MAX, |first, chunk| {
                for (j, x) in chunk.iter_mut().enumerate() {
                    *x += first * row_len + j + 1;
                }
            });
            let want: Vec<usize> = (1..=len).collect();
            assert_eq!(v, want, "rows {rows} row_len {row_len}");
        }
    }

    #[test]
    fn a_panic_in_a_chunk_reaches_the_caller() {
        let mut v = vec![0u8; 1 << 20];
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            for_row_chunks(&mut v, 1024, usize::MAX, |first, _| {
                if first > 0 {
                    panic!("chunk at {first}");
                }
            })
        }));
        assert!(r.is_err());
    }

    #[test]
    fn the_team_is_torchs_libgomp() {
        // The pip libtorch this project builds against runs on libgomp.
        assert!(available(), "libgomp.so.1 not found in the process");
        let _ = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
        let seen = Mutex::new(std::collections::HashSet::new());
        let mut v = vec![0u8; 1 << 20];
        for_row_chunks(&mut v, 1024, usize::MAX, |_, _| {
            seen.lock().unwrap().insert(std::thread::current().id());
        });
        let n = seen.lock().unwrap().len();
        // Every thread of the team takes part unless the caller finished every chunk first.
        assert!(
            (1..=threads_for(usize::MAX)).contains(&n),
            "{n} threads for a team of {}",
            threads_for(usize::MAX)
        );
    }
}
