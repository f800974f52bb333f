//! One module per command.

pub(crate) mod apply;
pub(crate) mod ca;
pub(crate) mod callers;
pub(crate) mod diff;
pub(crate) mod endpoints;
pub(crate) mod get;
pub(crate) mod history;
pub(crate) mod inject;
pub(crate) mod status;
pub(crate) mod traces;
pub(crate) mod validate;
