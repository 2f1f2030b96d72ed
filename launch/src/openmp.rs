// SPDX-License-Identifier: MPL-2.0
//! OpenMP idle policy for the daemon (issue 11: CPU of the noop runner).
//!
//! libtorch's CPU kernels run on libgomp, which the `rivulet` binary loads at start-up (it
//! links libtorch_cpu). By default libgomp's worker threads *spin* for a while after every
//! parallel region instead of sleeping. A live runner runs one short parallel region per frame
//! (colour conversion, crop, the model), so the workers spin between almost every pair of
//! frames: measured with `benches/e2e_latency.rs`, that spinning was over half of the noop
//! runner's CPU (0.47 → 0.19 CPU s per s of video with the 24 fps cap, 0.55 → 0.21 without).
//!
//! libgomp reads `OMP_WAIT_POLICY` once, when it is loaded, before `main` runs; so the daemon
//! re-executes itself once with `OMP_WAIT_POLICY=PASSIVE` when the variable is not set. An
//! explicit setting (e.g. `OMP_WAIT_POLICY=ACTIVE` for a throughput benchmark) is kept.

/// The policy the daemon runs with unless the environment says otherwise.
pub const DEFAULT_POLICY: &str = "PASSIVE";

/// Re-executes the current program with `OMP_WAIT_POLICY=PASSIVE` when the variable is unset.
/// Returns only if nothing had to be done or the re-execution failed (then the process goes on
/// with libgomp's default, which works, just with more CPU).
pub fn ensure_passive_wait_policy() {
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", DEFAULT_POLICY)
        .exec();
    eprintln!("rivulet: cannot re-execute with OMP_WAIT_POLICY={DEFAULT_POLICY} ({err}); going on");
}
