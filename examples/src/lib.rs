//! Shared code of the runnable examples: the load generator's library half, which the
//! `loadgen` example drives and the smoke test runs in-process.

pub mod loadgen;
