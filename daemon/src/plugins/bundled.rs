//! The plugins that come with phi3d (`clock`, `homeassistant`): their servers are built into
//! the `phi3d` binary as well as into binaries of their own, and their manifests ship in the
//! source tree (`plugins/plugins.d/`) and in an installed layout (`share/phi3d/plugins.d/`).
//!
//! This is what makes them work out of the box: `cargo run --release -- serve` builds only
//! `phi3d`, and with no plugins folder configured and none at the default place, phi3d serves
//! the bundled manifests; a manifest's bare `command = "phi3d-plugin-clock"` that names no
//! installed program then runs `phi3d` itself under that name, which serves the plugin
//! ([`run_if_invoked`]), busybox style.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where plugin manifests live unless configured (when it does not exist, the bundled
/// manifests are served).
pub const DEFAULT_PLUGINS_DIR: &str = "/etc/phi3d/plugins.d";

type Serve = fn() -> Result<(), Box<dyn std::error::Error>>;

/// Each bundled plugin's program name and server.
const BUNDLED: [(&str, Serve); 2] = [
    ("phi3d-plugin-clock", phi3d_plugin_clock::serve_stdio),
    ("phi3d-plugin-homeassistant", phi3d_plugin_homeassistant::serve_stdio),
];

/// Whether `program` is the name of a plugin built into phi3d.
pub fn is_bundled(program: &str) -> bool {
    BUNDLED.iter().any(|(name, _)| *name == program)
}

/// Serves the bundled plugin that the process was started as (its `argv[0]` names it), or
/// `None` when it was started as phi3d.
pub fn run_if_invoked() -> Option<ExitCode> {
    let arg0 = std::env::args_os().next()?;
    let invoked = Path::new(&arg0).file_name()?.to_str()?.to_owned();
    let (name, serve) = BUNDLED.iter().find(|(name, _)| *name == invoked)?;
    Some(match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error}");
            ExitCode::FAILURE
        }
    })
}

/// The plugins folder phi3d uses, and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginsFolder {
    pub path: PathBuf,
    pub origin: FolderOrigin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderOrigin {
    /// `plugins_dir` (file, `PHI3D_PLUGINS_DIR` or `--plugins-dir`).
    Configured,
    /// The default folder, which exists.
    Default,
    /// The bundled manifests, because nothing is configured and the default folder does not exist.
    Bundled,
}

impl std::fmt::Display for FolderOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FolderOrigin::Configured => "configured by plugins_dir",
            FolderOrigin::Default => "the default folder",
            FolderOrigin::Bundled => {
                "the bundled plugins, since plugins_dir is not set and the default folder does not exist"
            }
        })
    }
}

/// The configured folder, else the default one if it exists, else the bundled manifests if
/// they are found, else the default folder (and no plugins).
pub fn plugins_folder(configured: Option<&Path>) -> PluginsFolder {
    if let Some(path) = configured {
        return PluginsFolder { path: path.to_path_buf(), origin: FolderOrigin::Configured };
    }
    let default = PathBuf::from(DEFAULT_PLUGINS_DIR);
    if default.is_dir() {
        return PluginsFolder { path: default, origin: FolderOrigin::Default };
    }
    let exe = std::env::current_exe().ok();
    match manifests_folder(exe.as_deref()) {
        Some(path) => PluginsFolder { path, origin: FolderOrigin::Bundled },
        None => PluginsFolder { path: default, origin: FolderOrigin::Default },
    }
}

/// Where the bundled manifests are: beside an installed `phi3d` (`<prefix>/bin/phi3d` and
/// `<prefix>/share/phi3d/plugins.d`), else in the source tree phi3d was built from.
fn manifests_folder(exe: Option<&Path>) -> Option<PathBuf> {
    let installed = exe.and_then(Path::parent).map(|bin| bin.join("../share/phi3d/plugins.d"));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/plugins.d");
    installed.into_iter().chain([source]).find(|dir| dir.is_dir()).map(|dir| dir.canonicalize().unwrap_or(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_folder_wins() {
        let folder = plugins_folder(Some(Path::new("/srv/plugins")));
        assert_eq!(folder, PluginsFolder { path: "/srv/plugins".into(), origin: FolderOrigin::Configured });
    }

    #[test]
    fn the_bundled_manifests_are_found_installed_or_in_the_source_tree() {
        let prefix = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(prefix.path().join("bin")).unwrap();
        std::fs::create_dir_all(prefix.path().join("share/phi3d/plugins.d")).unwrap();
        let installed = manifests_folder(Some(&prefix.path().join("bin/phi3d"))).unwrap();
        assert_eq!(installed, prefix.path().join("share/phi3d/plugins.d").canonicalize().unwrap());
        let source = manifests_folder(Some(Path::new("/nonexistent/bin/phi3d"))).unwrap();
        assert!(source.join("clock.toml").is_file() && source.join("homeassistant.toml").is_file(), "{source:?}");
    }

    #[test]
    fn bundled_names() {
        assert!(is_bundled("phi3d-plugin-clock") && is_bundled("phi3d-plugin-homeassistant"));
        assert!(!is_bundled("phi3d") && !is_bundled("clock"));
    }
}
