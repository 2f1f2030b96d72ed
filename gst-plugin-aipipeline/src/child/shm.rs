// SPDX-License-Identifier: MPL-2.0
//! The `memfd` shared memory area: output slots at fixed offsets, then the input frame's
//! planes.
//!
//! Layout: [`OUT_SLOTS`] + 1 output slots of [`SLOT_LEN`] bytes each (room for the largest
//! output, 1024×1024 RGB), then the input area. The parent lends the first [`OUT_SLOTS`] slots
//! downstream as the memory of output buffers (a batch group writes a batch's outputs
//! into slots 0, 1, …, copied out, never lent) ([`LentSlot`]): the child writes a frame's
//! output straight into the buffer that is pushed, with no copy; the last slot is a scratch
//! slot, used (and copied out of) while every other one is lent. Slots never move (a bigger
//! input only grows the area after them), so a lent buffer stays valid across remaps; the
//! mapping it reads is kept alive by its `Arc`. Pages are only used where written (tmpfs).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::errno;

/// Output slots that can be lent downstream.
pub(super) const OUT_SLOTS: usize = 8;
/// Bytes per output slot: the largest output frame (1024×1024 RGB), page-aligned.
pub(super) const SLOT_LEN: usize = 1024 * 1024 * 3;
/// Where the input area starts.
pub(super) const INPUT_OFFSET: usize = (OUT_SLOTS + 1) * SLOT_LEN;

/// One `mmap` of the memfd, unmapped when the last user (the `Shm`, a lent slot) drops it.
pub(super) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; users access disjoint
// ranges (see `Shm::region_mut` and `LentSlot`).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping made by `Shm::map` and not unmapped elsewhere.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(super) struct Shm {
    pub(super) fd: OwnedFd,
    map: Option<Arc<Mapping>>,
    pub(super) len: usize,
}

impl Shm {
    pub(super) fn create() -> std::io::Result<Shm> {
        // SAFETY: plain syscall with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"rivulet-aipipeline".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd was just returned to us and is owned by nobody else.
        Ok(Shm::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The area behind an inherited fd (the child's fd 4), not mapped yet.
    pub(super) fn from_fd(fd: OwnedFd) -> Shm {
        Shm {
            fd,
            map: None,
            len: 0,
        }
    }

    /// Maps `len` bytes of the fd (the fd must already be that large).
    pub(super) fn map(&mut self, len: usize) -> std::io::Result<()> {
        self.map = None;
        self.len = 0;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a fresh shared mapping of our own fd; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        self.map = Some(Arc::new(Mapping { ptr: p.cast(), len }));
        self.len = len;
        Ok(())
    }

    pub(super) fn grow(&mut self, len: usize) -> std::io::Result<()> {
        // SAFETY: ftruncate on our own fd.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(errno());
        }
        self.map(len)
    }

    /// Bytes `range` of the area (empty when outside it).
    pub(super) fn region(&self, range: std::ops::Range<usize>) -> &[u8] {
        match &self.map {
            Some(m) if range.start <= range.end && range.end <= m.len => {
                // SAFETY: inside a live mapping; the other process writes a range only while
                // we wait for its reply (one request at a time), never while this borrow
                // lives, and no lent slot is written by anyone while lent.
                unsafe { std::slice::from_raw_parts(m.ptr.add(range.start), range.len()) }
            }
            _ => &[],
        }
    }

    /// Bytes `range` of the area, writable (empty when outside it). Callers keep off the
    /// slots lent downstream.
    pub(super) fn region_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        match &self.map {
            Some(m) if range.start <= range.end && range.end <= m.len => {
                // SAFETY: as in `region`, exclusively borrowed through &mut self; lent slots
                // are never in `range` (see the callers).
                unsafe { std::slice::from_raw_parts_mut(m.ptr.add(range.start), range.len()) }
            }
            _ => &mut [],
        }
    }

    /// The whole area, writable (the child's side: nothing of it is lent there).
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        self.region_mut(0..self.len)
    }

    /// Lends `len` bytes of output slot `slot` downstream; `busy` bit `slot` is set by the
    /// caller and cleared when the returned owner drops.
    pub(super) fn lend(&self, slot: usize, len: usize, busy: &Arc<AtomicU32>) -> Option<LentSlot> {
        let map = self.map.clone()?;
        let off = slot * SLOT_LEN;
        (slot < OUT_SLOTS && len <= SLOT_LEN && off + len <= map.len).then(|| LentSlot {
            map,
            off,
            len,
            busy: busy.clone(),
            bit: 1 << slot,
        })
    }
}

/// An output slot lent downstream as a buffer's memory (`gst::Memory::from_mut_slice`): the
/// slot is not used for another frame until this is dropped.
pub(super) struct LentSlot {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
    busy: Arc<AtomicU32>,
    bit: u32,
}

impl AsRef<[u8]> for LentSlot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: off + len <= map.len (checked in `lend`); the range is ours alone while lent.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(self.off), self.len) }
    }
}

impl AsMut<[u8]> for LentSlot {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.add(self.off), self.len) }
    }
}

impl Drop for LentSlot {
    fn drop(&mut self) {
        self.busy.fetch_and(!self.bit, Ordering::AcqRel);
    }
}
