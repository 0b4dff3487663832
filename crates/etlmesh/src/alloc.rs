//! The memory allocator.
//!
//! glibc's malloc by default. Measured with `bench/worker_memory.py` (README,
//! "Benchmark"): under request load a worker's heap stays near 7 MB with it, and fewer
//! arenas (`MALLOC_ARENA_MAX=2`) change nothing measurable; mimalloc served up to 40 %
//! more requests a second but held ~20 MB more heap in a worker and ~70 MB more at the
//! peak of a batch run. Built with `--features mimalloc`, the binary uses mimalloc.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
