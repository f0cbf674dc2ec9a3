//! The node's allocator: jemalloc, set to give freed memory back to the system by itself.
//!
//! glibc's malloc cost the node about a fifth of its CPU on a message's path (small buffers
//! allocated on one thread and freed on another) and kept what connections had used in its
//! per-thread arenas after they closed, which needed a periodic `malloc_trim`. jemalloc is
//! quicker on that path, and with background threads purging pages left unused for a second,
//! most of what closed connections used goes back within two seconds (figures in BENCHMARKS.md).

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options, read once when the allocator initialises (the variable
/// `_RJEM_MALLOC_CONF` still overrides them): background purging threads, unused dirty pages
/// purged after 1 s and returned at once after that (no muzzy stage).
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
