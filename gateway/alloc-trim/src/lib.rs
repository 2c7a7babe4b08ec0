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
//! It also sets how much free memory an arena may keep at its top
//! ([`keep_free_top`]), so that the relay's packet buffers do not fault
//! their pages in again and again.
//!
//! These are the only foreign calls in ci-gateway; they live in their own
//! crate so that the gateway keeps `forbid(unsafe_code)`.

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

/// Lets each arena keep up to `bytes` of free memory at its top instead of
/// handing it back at once (glibc's `M_TRIM_THRESHOLD`, 128 KiB by default).
/// A relay frees and allocates its 32–64 KiB packet buffers all the time; at
/// the default, every time an arena's free top passed 128 KiB glibc gave it
/// back with `madvise(MADV_DONTNEED)` and the next buffers faulted the pages
/// in again (docs/performance.md: 203,000 page faults in one `--only jump`
/// run, 5,400 with 4 MiB). Memory freed below live allocations is untouched,
/// and [`release_free_memory`] still gives back everything after a drop in
/// load. Returns whether the allocator took the setting; call it once, before
/// the runtime's threads start. Elsewhere than glibc it does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn keep_free_top(bytes: usize) -> bool {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` takes two integers and no pointers; glibc applies it
    // under the main arena's lock.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) == 1 }
}

/// See the glibc version above; nothing to do here.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_free_top(_bytes: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_allocator_takes_the_trim_threshold() {
        assert!(super::keep_free_top(4 << 20));
    }

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
