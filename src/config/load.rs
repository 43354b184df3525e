//! Loading resources from files and directories (placeholder until implemented).
use std::path::{Path, PathBuf};

use super::LoadedSet;

/// Loads every `.yaml`/`.yml` file under `paths`.
pub fn load_paths(_paths: &[PathBuf], _default_namespace: &str) -> LoadedSet {
    LoadedSet::default()
}

/// Loads one YAML text as if read from `name`.
pub fn load_str(_name: &Path, _text: &str, _default_namespace: &str) -> LoadedSet {
    LoadedSet::default()
}
