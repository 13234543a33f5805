//! Float buffers in memory of their own, mapped from the kernel (`mmap`) rather than taken from
//! the C allocator: freeing one gives its memory back to the system at once, and growing one
//! (`mremap`) never holds the old and the new copy at the same time. The KV pool and the prefix
//! cache live in these, so their megabytes neither linger in malloc's arenas after a burst nor
//! fragment them. Pages are page-aligned (more than the 64 bytes ONNX Runtime's kernels want)
//! and start zeroed.

use std::ptr::NonNull;

use crate::memory::page_size;

pub struct Pages {
    /// The mapping; dangling (and never unmapped) while `mapped` is 0.
    ptr: NonNull<f32>,
    /// Floats in use.
    len: usize,
    /// Bytes mapped.
    mapped: usize,
}

// SAFETY: `Pages` owns its mapping exclusively, like a `Vec<f32>`.
unsafe impl Send for Pages {}
// SAFETY: shared access only reads, as through `&[f32]`.
unsafe impl Sync for Pages {}

fn bytes_for(len: usize) -> usize {
    let page = page_size();
    (len * std::mem::size_of::<f32>()).div_ceil(page) * page
}

impl Pages {
    /// `len` zeroed floats. Panics, as `Vec` does, when the system has no memory to map.
    pub fn zeroed(len: usize) -> Self {
        let mut pages = Self::default();
        pages.resize(len);
        pages
    }

    /// Grows or shrinks to `len` floats; floats kept keep their values, new ones are zero.
    pub fn resize(&mut self, len: usize) {
        let bytes = bytes_for(len);
        // Floats past the new end that stay mapped must read as zero if it grows again.
        let still_mapped = (bytes / std::mem::size_of::<f32>()).min(self.len);
        if len < still_mapped {
            self[len..still_mapped].fill(0.0);
        }
        if bytes != self.mapped {
            self.remap(bytes);
        }
        self.len = len;
    }

    fn remap(&mut self, bytes: usize) {
        let ptr = if bytes == 0 {
            self.unmap();
            NonNull::dangling()
        } else if self.mapped == 0 {
            // SAFETY: a fresh private anonymous mapping; the kernel zeroes it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            mapped_or_abort(p, bytes)
        } else {
            // SAFETY: `ptr` and `mapped` describe our own mapping; the kernel may move it, and
            // the pages grown are zero.
            let p = unsafe { libc::mremap(self.ptr.as_ptr().cast(), self.mapped, bytes, libc::MREMAP_MAYMOVE) };
            mapped_or_abort(p, bytes)
        };
        self.ptr = ptr;
        self.mapped = bytes;
    }

    /// Sets `range` to zero, giving whole pages back to the system (`MADV_DONTNEED`: they read
    /// as zero and take no memory until written again) and writing zeros only at its edges.
    pub fn discard(&mut self, range: std::ops::Range<usize>) {
        let per_page = page_size() / std::mem::size_of::<f32>();
        let first_page = range.start.div_ceil(per_page) * per_page;
        let end_page = range.end / per_page * per_page;
        if first_page >= end_page {
            self[range].fill(0.0);
            return;
        }
        self[range.start..first_page].fill(0.0);
        self[end_page..range.end].fill(0.0);
        // SAFETY: whole pages inside our own private anonymous mapping; they read as zero after.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(first_page).cast(),
                (end_page - first_page) * std::mem::size_of::<f32>(),
                libc::MADV_DONTNEED,
            );
        }
    }

    /// Bytes of it in memory now (`mincore`): pages never written are not.
    pub fn resident_bytes(&self) -> usize {
        if self.mapped == 0 {
            return 0;
        }
        let page = page_size();
        let mut present = vec![0u8; self.mapped / page];
        // SAFETY: our own mapping of `mapped` bytes, and a vector of one byte per page.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.mapped, present.as_mut_ptr()) };
        if rc != 0 {
            return self.mapped;
        }
        present.iter().filter(|&&p| p & 1 == 1).count() * page
    }

    fn unmap(&mut self) {
        if self.mapped > 0 {
            // SAFETY: our own mapping, unmapped once; nothing borrows it (we hold `&mut self`).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
            self.mapped = 0;
        }
    }
}

/// The mapping's address, or the same end a failed `Vec` allocation has.
fn mapped_or_abort(p: *mut libc::c_void, bytes: usize) -> NonNull<f32> {
    if p == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(bytes, page_size()).expect("page layout"));
    }
    NonNull::new(p.cast()).expect("mmap does not return NULL on success")
}

impl Default for Pages {
    fn default() -> Self {
        Self { ptr: NonNull::dangling(), len: 0, mapped: 0 }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl Clone for Pages {
    fn clone(&self) -> Self {
        let mut copy = Pages::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl From<&[f32]> for Pages {
    fn from(data: &[f32]) -> Self {
        let mut pages = Pages::zeroed(data.len());
        pages.copy_from_slice(data);
        pages
    }
}

impl std::ops::Deref for Pages {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` floats are mapped (or `len` is 0 and the pointer dangling but aligned).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Pages {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks_keeping_values_and_zeroing_the_rest() {
        let mut p = Pages::zeroed(10);
        assert!(p.iter().all(|&x| x == 0.0));
        assert_eq!(p.as_ptr() as usize % page_size(), 0);
        p[3] = 7.0;
        p.resize(3_000_000);
        assert_eq!((p[3], p[2_999_999]), (7.0, 0.0));
        p[2_999_999] = 1.0;
        p.resize(5);
        p.resize(3_000_000);
        assert_eq!((p[3], p[4], p[2_999_999]), (7.0, 0.0, 0.0));
        let q = p.clone();
        assert_eq!(q[3], 7.0);
        // Two pages written (the first and the last), the rest never touched.
        let mut r = Pages::zeroed(1_000_000);
        r[0] = 1.0;
        r[999_999] = 1.0;
        assert_eq!(r.resident_bytes(), 2 * page_size());
        // Discarding gives whole pages back and zeroes the edges.
        r.fill(3.0);
        r.discard(5..999_990);
        assert_eq!(r.resident_bytes(), 2 * page_size());
        assert_eq!((r[4], r[5], r[500_000], r[999_989], r[999_990]), (3.0, 0.0, 0.0, 0.0, 3.0));
        p.resize(0);
        assert_eq!((p.len(), p.mapped), (0, 0));
    }
}
