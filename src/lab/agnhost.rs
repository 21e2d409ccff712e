//! The built-in test workload. (Being written.)
