// SPDX-License-Identifier: MPL-2.0
//! The shared memory between the element and its inference child: two `memfd`s.
//!
//! **The frame area** (the child's fd 4, [`Shm`]): [`OUT_SLOTS`] + 1 output slots of
//! [`SLOT_LEN`] bytes each (room for the largest output, 1024×1024 RGB), then the copy input
//! area. The parent lends the first [`OUT_SLOTS`] slots downstream as the memory of output
//! buffers ([`LentSlot`]; a batch group writes a batch's outputs into slots 0, 1, …, copied
//! out, never lent): the child writes a frame's output straight into the buffer that is
//! pushed, with no copy; the last slot is a scratch slot, used (and copied out of) while every
//! other one is lent. An input frame whose memory is not an input slot (below) is copied into
//! the input area after the slots. Slots never move (a bigger input only grows the area after
//! them), so a lent buffer stays valid across remaps; the mapping it reads is kept alive by
//! its `Arc`.
//!
//! **The input area** (the child's fd 5, [`InputArea`]; only for an element with its own
//! child, not a batch group): one per element run, inherited by every child the element
//! starts (restarts included). It holds the input slots, the memory of the buffers of the
//! pool the element proposes upstream in the ALLOCATION query
//! ([`super::ShmInputPool`]): upstream decodes straight into them, and the frame request
//! names the planes' offsets in this area instead of copying them (the child maps it
//! read-only). Each slot is its own page-aligned range of the file with its own mapping in the
//! parent ([`InputSlot`], the memory of one pool buffer); the range goes back to the area's
//! free list only when that memory is freed, so it is never reused while a buffer uses it.
//! Ranges are reused for later slots of a size they fit; the file only grows. Memory that is
//! not a live slot of this area (another pool's, a slot of an earlier run's area) simply takes
//! the copy path. Pages of either area are only used where written (tmpfs).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

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

impl Mapping {
    /// A fresh shared mapping of `len` bytes of `fd` from `offset` (page-aligned).
    fn new(fd: RawFd, offset: u64, len: usize, prot: libc::c_int) -> std::io::Result<Mapping> {
        let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: a fresh shared mapping of a valid fd; checked for MAP_FAILED.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

fn memfd(name: &std::ffi::CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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
        Ok(Shm::from_fd(memfd(c"rivulet-aipipeline")?))
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
        self.map_prot(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// As [`Shm::map`], read-only (the child's view of the input area: it never writes
    /// there). [`Shm::region_mut`] and [`Shm::bytes_mut`] must not be used on it.
    pub(super) fn map_read_only(&mut self, len: usize) -> std::io::Result<()> {
        self.map_prot(len, libc::PROT_READ)
    }

    fn map_prot(&mut self, len: usize, prot: libc::c_int) -> std::io::Result<()> {
        self.map = None;
        self.len = 0;
        if len == 0 {
            return Ok(());
        }
        let m = Mapping::new(self.fd.as_raw_fd(), 0, len, prot)?;
        self.map = Some(Arc::new(m));
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

/// The input area: a memfd of input slots, handed to every child of one element as fd 5
/// (see the module docs).
pub struct InputArea {
    fd: OwnedFd,
    inner: Mutex<AreaInner>,
}

#[derive(Default)]
struct AreaInner {
    /// Length of the file.
    len: u64,
    /// Ranges (offset, length) of freed slots, for reuse.
    free: Vec<(u64, usize)>,
    /// Live slots by the address of their mapping in this process: (offset, length).
    live: BTreeMap<usize, (u64, usize)>,
}

impl std::fmt::Debug for InputArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputArea")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

impl InputArea {
    pub fn create() -> std::io::Result<Arc<InputArea>> {
        Ok(Arc::new(InputArea {
            fd: memfd(c"rivulet-aipipeline-input")?,
            inner: Mutex::new(AreaInner::default()),
        }))
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A slot of at least `len` bytes (its memory reads as exactly `len` bytes): a freed range
    /// it fits (the smallest), else a new one at the end of the file.
    pub fn alloc(self: &Arc<Self>, len: usize) -> std::io::Result<InputSlot> {
        if len == 0 {
            return Err(std::io::Error::other("an input slot of 0 bytes"));
        }
        let cap = len
            .checked_next_multiple_of(page_size())
            .ok_or_else(|| std::io::Error::other("input slot too large"))?;
        let mut inner = self.inner.lock().unwrap();
        let reuse = (inner.free.iter().enumerate())
            .filter(|(_, (_, l))| *l >= cap)
            .min_by_key(|(_, (_, l))| *l)
            .map(|(i, _)| i);
        let (off, cap) = match reuse {
            Some(i) => inner.free.swap_remove(i),
            None => {
                let off = inner.len;
                let end = off
                    .checked_add(cap as u64)
                    .and_then(|e| libc::off_t::try_from(e).ok())
                    .ok_or_else(|| std::io::Error::other("input area too large"))?;
                // SAFETY: ftruncate on our own fd.
                if unsafe { libc::ftruncate(self.fd.as_raw_fd(), end) } != 0 {
                    return Err(errno());
                }
                inner.len = end as u64;
                (off, cap)
            }
        };
        let map = match Mapping::new(
            self.fd.as_raw_fd(),
            off,
            cap,
            libc::PROT_READ | libc::PROT_WRITE,
        ) {
            Ok(m) => m,
            Err(e) => {
                inner.free.push((off, cap));
                return Err(e);
            }
        };
        inner.live.insert(map.ptr as usize, (off, cap));
        Ok(InputSlot {
            area: self.clone(),
            map: Some(map),
            len,
        })
    }

    /// Offsets in the area of `planes` when every one lies inside one live slot (the memory
    /// of one pool buffer), and the area's length then; None otherwise (copy them).
    pub(super) fn locate(&self, planes: &[&[u8]]) -> Option<(Vec<u64>, u64)> {
        let first = planes.first()?.as_ptr() as usize;
        let inner = self.inner.lock().unwrap();
        let (&base, &(off, cap)) = inner.live.range(..=first).next_back()?;
        let offsets = planes
            .iter()
            .map(|p| {
                let start = (p.as_ptr() as usize).checked_sub(base)?;
                (start.checked_add(p.len())? <= cap).then_some(off + start as u64)
            })
            .collect::<Option<Vec<u64>>>()?;
        Some((offsets, inner.len))
    }
}

/// One input slot: the memory of one buffer of the proposed pool
/// (`gst::Buffer::from_mut_slice`). Its range of the input area is returned to the area's
/// free list when this is dropped (when the memory is freed), never earlier.
pub struct InputSlot {
    area: Arc<InputArea>,
    /// Always Some until drop.
    map: Option<Mapping>,
    len: usize,
}

impl AsRef<[u8]> for InputSlot {
    fn as_ref(&self) -> &[u8] {
        match &self.map {
            // SAFETY: len <= map.len (a page-rounded `len`); the range is this slot's alone.
            Some(m) => unsafe { std::slice::from_raw_parts(m.ptr, self.len.min(m.len)) },
            None => &[],
        }
    }
}

impl AsMut<[u8]> for InputSlot {
    fn as_mut(&mut self) -> &mut [u8] {
        match &self.map {
            // SAFETY: as in `as_ref`, exclusively borrowed (the child only reads it).
            Some(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr, self.len.min(m.len)) },
            None => &mut [],
        }
    }
}

impl Drop for InputSlot {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let mut inner = self.area.inner.lock().unwrap();
        if let Some((off, cap)) = inner.live.remove(&(map.ptr as usize)) {
            // Unmapped before the range can be handed out again.
            drop(map);
            inner.free.push((off, cap));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_slots_are_found_reused_only_when_freed_and_foreign_memory_is_not() {
        let area = InputArea::create().unwrap();
        let mut a = area.alloc(10_000).unwrap();
        let b = area.alloc(5000).unwrap();
        assert_eq!(a.as_ref().len(), 10_000);
        a.as_mut()[..3].copy_from_slice(&[1, 2, 3]);
        let (offs, len) = area
            .locate(&[&a.as_ref()[..100], &a.as_ref()[200..300]])
            .unwrap();
        assert_eq!(offs, vec![0, 200]);
        let page = page_size() as u64;
        assert_eq!(
            len,
            10_000u64.next_multiple_of(page) + 5000u64.next_multiple_of(page)
        );
        let (offs, _) = area.locate(&[b.as_ref()]).unwrap();
        assert_eq!(offs, vec![10_000u64.next_multiple_of(page)]);
        // Planes of two slots, heap memory, a range past the slot: not a slot.
        assert!(area.locate(&[a.as_ref(), b.as_ref()]).is_none());
        let heap = vec![0u8; 100];
        assert!(area.locate(&[&heap]).is_none());
        // The file holds what was written through the slot.
        let mut child = Shm::from_fd(area.fd.try_clone().unwrap());
        child.map_read_only(len as usize).unwrap();
        assert_eq!(&child.region(0..3), &[1, 2, 3]);
        // A freed range is reused (not before), by a slot it fits.
        let b_off = offs[0];
        let c = area.alloc(6000).unwrap();
        assert_ne!(area.locate(&[c.as_ref()]).unwrap().0[0], b_off);
        drop(b);
        let d = area.alloc(4000).unwrap();
        assert_eq!(area.locate(&[d.as_ref()]).unwrap().0, vec![b_off]);
    }
}
