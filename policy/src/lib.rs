//! weft's policy resources, in one place for every component.
//!
//! - [`doc`]: the documents operators write and etcd stores (YAML/JSON);
//! - [`model`]: the typed model a valid document means;
//! - [`check`]: the rules that turn a document, or a resource off the wire,
//!   into the model, naming each wrong field;
//! - [`wire`]: the model as `weft.v1` carries it, both ways;
//! - [`documents`]: multi-document YAML files with lines for every problem,
//!   within size and depth limits;
//! - [`id`], [`names`], [`duration`], [`diff`]: what a resource is called,
//!   how names and durations are written, and field-by-field changes.
//!
//! `weftctl validate`, the control plane (before a write reaches etcd, and
//! again for what etcd holds) and every sidecar (before it ACKs an update)
//! apply the same rules through this crate.
#![forbid(unsafe_code)]

pub mod check;
pub mod diff;
pub mod doc;
pub mod documents;
pub mod duration;
pub mod id;
pub mod model;
pub mod names;
pub mod wire;

pub use doc::Resource;
pub use id::{Kind, ResourceId, normalize_kind};
pub use model::Policy;

/// One wrong field of one resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct FieldError {
    /// Dotted path of the field, e.g. `rules[1].retry.attempts`; empty for
    /// the resource as a whole.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// A resource that breaks the rules, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidPolicy {
    /// `kind/name`, e.g. `route/inference/acme`.
    pub resource: String,
    pub errors: Vec<FieldError>,
}

/// Converts a document to the model, or lists every wrong field.
pub fn check(resource: &Resource) -> Result<Policy, Vec<FieldError>> {
    doc::check(resource)
}

/// Every problem of a document (none when [`check`] succeeds).
pub fn validate(resource: &Resource) -> Vec<FieldError> {
    check(resource).err().unwrap_or_default()
}
