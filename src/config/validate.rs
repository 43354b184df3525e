//! Per-resource validation (placeholder until implemented).
use super::{Diagnostic, Resource};

/// Checks one resource on its own; cross-references are checked by the compiler.
pub fn validate_resource(_r: &Resource, _out: &mut Vec<Diagnostic>) {}
