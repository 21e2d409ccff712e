//! Benchmarks run by `scripts/bench-*.sh` (hidden `veilnet bench …` commands). They measure; they
//! never assert: the numbers go into the closing notes side by side.

pub mod cni;
pub mod policy;
pub mod relay;
pub mod wg;
