//! Notices changes to the manifests in the plugins folder.
//!
//! The watcher only says *that* something changed; the registry then rescans the whole
//! folder. Rescanning is cheap (a few small files) and robust against every way editors and
//! package managers replace files (write in place, write and rename, delete and create), and
//! against the kernel dropping events when its queue overflows.

use std::path::Path;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Watches `dir` (not its subfolders); every relevant change sends one `()` on the receiver.
/// The watcher stops when it is dropped.
pub fn watch(dir: &Path) -> notify::Result<(RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (changed, receiver) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(event) => is_relevant(&event),
            // An error may mean lost events: rescan to be sure.
            Err(_) => true,
        };
        if relevant {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, receiver))
}

/// Whether `event` may have changed a manifest. Reads (including the registry's own) are not.
fn is_relevant(event: &notify::Event) -> bool {
    let mutating = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    // No paths means the backend could not say which files: treat as any.
    let manifest = event.paths.is_empty() || event.paths.iter().any(|p| is_manifest(p));
    mutating && manifest
}

/// `*.toml`, but not hidden files (editor lock files such as `.#clock.toml`).
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !name.starts_with('.') && name.ends_with(".toml") && name.len() > ".toml".len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_toml_files_that_are_not_hidden() {
        assert!(is_manifest(Path::new("/etc/phi3d/plugins.d/clock.toml")));
        assert!(!is_manifest(Path::new("/etc/phi3d/plugins.d/.#clock.toml")));
        assert!(!is_manifest(Path::new("/etc/phi3d/plugins.d/clock.toml.swp")));
        assert!(!is_manifest(Path::new("/etc/phi3d/plugins.d/.toml")));
    }

    #[tokio::test]
    async fn writing_a_manifest_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let (_watcher, mut changes) = watch(dir.path()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("clock.toml"), "x").unwrap();
        let noticed = tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv()).await;
        assert_eq!(noticed.unwrap(), Some(()));
    }
}
