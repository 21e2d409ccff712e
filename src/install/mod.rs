//! What installing veilnet on a cluster asks of it, as data the install manifest is checked
//! against.
//!
//! - `api_calls`: every Kubernetes API call the agent makes (the single source of truth for RBAC).
//! - `rbac`: a pure evaluator of RBAC roles and bindings with Kubernetes' matching rules, used to
//!   prove the manifest grants exactly those calls and nothing more.

pub mod api_calls;
pub mod rbac;

pub use api_calls::{ApiCall, Scope, AGENT_API_CALLS};
