//! HTTP as the sidecar speaks it: the sidecar's own error answers,
//! request-head handling, and the marks every answer gets.

pub(crate) mod deadline;
pub(crate) mod errors;
pub(crate) mod headers;
pub(crate) mod response;
pub(crate) mod stream;
