//! What installing veilnet on a cluster asks of it, as data the install manifest is checked
//! against.
//!
//! - `api_calls`: every Kubernetes API call the agent makes (the single source of truth for RBAC;
//!   `tests/rbac.rs` checks the manifest against it with the lab crate's RBAC evaluator).

pub mod api_calls;

pub use api_calls::{ApiCall, Scope, AGENT_API_CALLS};
