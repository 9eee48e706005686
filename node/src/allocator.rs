//! The one place the workspace allows `unsafe`: telling glibc's allocator
//! to keep chunk-sized buffers out of its heaps, which a backup's memory
//! budget ([`crate::memory_budget`]) and a node's per-upload bound need to
//! mean what they say.
//!
//! A backup allocates chunk buffers of up to 4 MiB on one thread and frees
//! them on another (walk, compression, transport). glibc raises its mmap
//! threshold to the size of the first such block freed, after which they
//! all come from its per-thread arenas, which fragment: measured on 1.4 GB
//! of dumps, `fabricctl backup` under a 32 MiB budget was resident at 80
//! MiB with the default and at 52 MiB with a fixed 1 MiB threshold, as fast
//! within the run-to-run noise. The binaries call [`tune`] first thing.
//!
//! It must never do anything else: no other allocator setting, no other
//! `unsafe`.

/// The mmap threshold set: blocks from this size up are mapped on their own
/// and given back to the system when freed.
pub const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD_BYTES`], unless the
/// environment sets one (`MALLOC_MMAP_THRESHOLD_`, which glibc reads
/// itself). Call it at the start of `main`, before other threads start.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: mallopt only changes parameters of glibc's malloc, takes no
    // pointers, and is called before the program starts other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

/// Other allocators (musl, other systems) are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
