//! Hot reload: watch every config path's directory (never the file itself:
//! Kubernetes ConfigMap volumes swap a `..data` symlink, and a watch on the
//! file follows the old inode and goes dead), debounce the burst of events,
//! then re-read and apply. A periodic re-read covers missed events.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::runtime::{ApplyOutcome, Proxy, RELOAD_DEBOUNCE, RELOAD_RESYNC};

/// Keeps the watcher alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
}

/// The directories to watch for `paths`: a directory itself, a file's parent.
pub fn watch_dirs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Whether an event may mean changed config. Any event but a read may:
/// kubelet's swap shows up as creates, renames and removes of dot-directories,
/// never as a write to the file; a writer closing its file is the end of a
/// write. Opening and reading change nothing, and the reload's own reads of
/// the files must not set off another reload.
fn may_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts watching the proxy's config paths and reloading on change.
pub fn spawn(proxy: Arc<Proxy>) -> notify::Result<WatchHandle> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| may_change(&e.kind)) {
            let _ = tx.send(());
        }
    })?;
    for dir in watch_dirs(&proxy.options().config_paths) {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        tracing::debug!(dir = %dir.display(), "watching for config changes");
    }
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RELOAD_RESYNC);
        resync.tick().await;
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    if ev.is_none() {
                        return;
                    }
                    tokio::time::sleep(RELOAD_DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = resync.tick() => {}
            }
            match proxy.reload_from_files().await {
                ApplyOutcome::Applied { version, .. } => tracing::info!(%version, "reloaded config"),
                ApplyOutcome::Unchanged { .. } => {}
                ApplyOutcome::Rejected { .. } => {}
            }
        }
    });
    Ok(WatchHandle { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};

    use super::may_change;

    #[test]
    fn reads_are_not_changes() {
        assert!(!may_change(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!may_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!may_change(&EventKind::Access(AccessKind::Read)));
        assert!(may_change(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(may_change(&EventKind::Create(CreateKind::Folder)));
        assert!(may_change(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
        assert!(may_change(&EventKind::Remove(RemoveKind::Any)));
        assert!(may_change(&EventKind::Any));
    }
}
