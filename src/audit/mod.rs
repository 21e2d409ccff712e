//! `veilnet audit`: what in the cluster weakens the isolation veilnet gives, each finding with the
//! object, the risk and the fix.
//!
//! - [`findings`]: the auditor, a pure function from the API objects (pods, namespaces,
//!   NetworkPolicies, Nodes) to findings, unit-tested without a cluster.
//! - [`cli`]: reads those objects (a kubeconfig or a lab), prints a table or JSON, and turns the
//!   findings into an exit status (1 when anything is found, so CI can gate on it).
//!
//! The pod checks are the ones `manifests/admission-policy.yaml` enforces at admission, so an
//! audit finds what was admitted before that policy was bound (or in namespaces it does not cover).

pub mod cli;
pub mod findings;

pub use findings::{audit, Finding, Kind, Report, SYSTEM_NAMESPACES};
