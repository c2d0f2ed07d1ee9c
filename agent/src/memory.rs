//! Keeping the agent's resident memory down. glibc's allocator keeps
//! freed memory; the agent's one big transient allocation is the kernel's
//! BTF, parsed while the eBPF programs load, and without a trim its pages
//! stay resident for the agent's whole life (about 17 MiB here).

/// Returns freed heap memory to the kernel (glibc's `malloc_trim`).
/// Call after a large transient allocation has been dropped.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
