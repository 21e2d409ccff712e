//! The lab's control planes besides the embedded API stand-in (`apiserver`): the real Kubernetes
//! components (`kubernetes`) and their certificates (`pki`).

pub mod kubernetes;
pub mod pki;
