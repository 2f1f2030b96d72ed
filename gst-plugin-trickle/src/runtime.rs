// SPDX-License-Identifier: MPL-2.0
//! The shared tokio runtime of the trickle elements, and [`block_on`], the one function through
//! which a streaming thread waits for network I/O.
//!
//! As in gst-plugins-rs `net/reqwest`: every blocking wait of an element runs on this runtime
//! with an abort handle registered in the element's [`Canceller`], so that `unlock()` (flushing,
//! state change to READY/NULL) cancels it at once instead of waiting for the network. Streaming
//! threads are GStreamer threads, never tokio workers; callers that drive state changes from
//! async code must do so from `spawn_blocking` or a dedicated thread, never on a tokio worker
//! (tokio panics when a runtime's `block_on` is called from inside a runtime).

use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use futures::future::{AbortHandle, Abortable};

static RUNTIME: LazyLock<Result<tokio::runtime::Runtime, String>> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("trickle-runtime")
        .build()
        .map_err(|err| format!("Cannot start the trickle tokio runtime: {err}"))
});

/// The shared runtime, or why it could not be started (out of threads or file descriptors).
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    RUNTIME.as_ref().map_err(Clone::clone)
}

/// Why [`block_on`] returned without the future's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// `unlock()` / stop cancelled the wait (or was already in force).
    Cancelled,
    /// The wait's own time limit passed.
    Timeout,
    /// The runtime could not be started.
    NoRuntime,
}

#[derive(Debug, Default)]
enum CancelState {
    #[default]
    Idle,
    Waiting(AbortHandle),
    Flushing,
}

/// Cancels the current (and every further) wait of one element until [`Canceller::reset`].
#[derive(Debug, Default)]
pub(crate) struct Canceller {
    state: Mutex<CancelState>,
}

impl Canceller {
    /// Abort the running wait, if any, and refuse new ones until [`Canceller::reset`]
    /// (`unlock()`).
    pub(crate) fn cancel(&self) {
        let mut state = self.state.lock().unwrap();
        if let CancelState::Waiting(handle) = &*state {
            handle.abort();
        }
        *state = CancelState::Flushing;
    }

    /// Allow waits again (`unlock_stop()`, `start()`).
    pub(crate) fn reset(&self) {
        *self.state.lock().unwrap() = CancelState::Idle;
    }
}

/// Run `future` on the shared runtime from a non-tokio thread, blocking until it completes,
/// `canceller` cancels it, or `timeout` passes. No lock is held while waiting.
pub(crate) fn block_on<F: Future>(
    canceller: &Canceller,
    timeout: Option<Duration>,
    future: F,
) -> Result<F::Output, WaitError> {
    let rt = runtime().map_err(|_| WaitError::NoRuntime)?;
    let (handle, registration) = AbortHandle::new_pair();
    {
        let mut state = canceller.state.lock().unwrap();
        if matches!(*state, CancelState::Flushing) {
            return Err(WaitError::Cancelled);
        }
        *state = CancelState::Waiting(handle);
    }
    let abortable = Abortable::new(future, registration);
    let result = rt.block_on(async move {
        match timeout {
            Some(limit) => match tokio::time::timeout(limit, abortable).await {
                Ok(Ok(output)) => Ok(output),
                Ok(Err(_aborted)) => Err(WaitError::Cancelled),
                Err(_elapsed) => Err(WaitError::Timeout),
            },
            None => abortable.await.map_err(|_aborted| WaitError::Cancelled),
        }
    });
    let mut state = canceller.state.lock().unwrap();
    if matches!(*state, CancelState::Waiting(_)) {
        *state = CancelState::Idle;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_times_out_and_cancels() {
        let canceller = Canceller::default();
        assert_eq!(block_on(&canceller, None, async { 7 }), Ok(7));
        assert_eq!(
            block_on(
                &canceller,
                Some(Duration::from_millis(10)),
                std::future::pending::<()>()
            ),
            Err(WaitError::Timeout)
        );
        canceller.cancel();
        assert_eq!(
            block_on(&canceller, None, async { 1 }),
            Err(WaitError::Cancelled)
        );
        canceller.reset();
        assert_eq!(block_on(&canceller, None, async { 2 }), Ok(2));
    }

    #[test]
    fn cancel_from_another_thread_ends_a_pending_wait() {
        let canceller = std::sync::Arc::new(Canceller::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let canceller = canceller.clone();
            std::thread::spawn(move || {
                block_on(&canceller, None, async {
                    tx.send(()).unwrap();
                    std::future::pending::<()>().await
                })
            })
        };
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        canceller.cancel();
        assert_eq!(waiter.join().unwrap(), Err(WaitError::Cancelled));
    }
}
