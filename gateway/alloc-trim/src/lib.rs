//! Gives the operating system back the memory glibc's allocator keeps after
//! the program freed it.
//!
//! glibc returns freed memory to the system only from the top of each arena.
//! After thousands of sessions close, their pages sit below allocations that
//! are still live (the store, caches, the sessions that stayed), so the
//! process stays at its peak resident size: reused, never leaked, but not
//! available to anything else on the machine. `malloc_trim(0)` walks every
//! arena and releases the free pages inside it (`madvise(MADV_DONTNEED)`).
//!
//! This is the only foreign call in ci-gateway; it lives in its own crate so
//! that the gateway keeps `forbid(unsafe_code)`.

/// Asks the allocator to return its free pages to the system. Returns whether
/// any memory was released. It locks each arena in turn (milliseconds on a
/// large heap): call it from a blocking thread, after a large drop in load,
/// not on a hot path. Elsewhere than glibc it does nothing and returns
/// `false`: musl, macOS and Windows allocators have no such call and do not
/// keep pages the same way.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and has no preconditions; glibc
    // serializes it with every other allocator call through the arena locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// See the glibc version above; nothing to do here.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// Frees many small blocks below a live one, so the freed pages are not at
    /// the top of the heap, and checks that trimming reports a release.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn releases_pages_freed_below_live_allocations() {
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 4000]).collect();
        let keep = vec![1u8; 4000];
        drop(blocks);
        assert!(
            super::release_free_memory(),
            "16 MB freed, nothing released"
        );
        assert_eq!(keep[0], 1);
    }
}
