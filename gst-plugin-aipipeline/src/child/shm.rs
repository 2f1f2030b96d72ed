// SPDX-License-Identifier: MPL-2.0
//! The `memfd` shared memory area holding an input frame's planes and the output slot.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::errno;

pub(super) struct Shm {
    pub(super) fd: OwnedFd,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through &self / &mut self.
unsafe impl Send for Shm {}

impl Shm {
    pub(super) fn create() -> std::io::Result<Shm> {
        // SAFETY: plain syscall with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"rivulet-aipipeline".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: fd was just returned to us and is owned by nobody else.
        Ok(Shm {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            ptr: std::ptr::null_mut(),
            len: 0,
        })
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr/len describe a mapping made by `map` and not yet unmapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
        self.ptr = std::ptr::null_mut();
        self.len = 0;
    }

    /// Maps `len` bytes of the fd (the fd must already be that large).
    pub(super) fn map(&mut self, len: usize) -> std::io::Result<()> {
        self.unmap();
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
        self.ptr = p.cast();
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

    pub(super) fn bytes(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: ptr/len is a live mapping owned by self; the other process only writes to it
        // while we wait for its reply (one request at a time), never while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: as in `bytes`, exclusively borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        self.unmap();
    }
}
