//! What deploy/ ships: the systemd units (the daemon's, and the RPC worker's) pass `systemd-analyze verify`, and the Debian package
//! holds the binaries, the units, the default config and the bundled manifests. Each test is
//! skipped, saying so, when its tool (systemd-analyze, cargo-deb) is not installed; .ci/run
//! installs both.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::PHI3D;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("daemon/ is in the repository").to_path_buf()
}

fn installed(program: &str, version_flag: &[&str]) -> bool {
    Command::new(program).args(version_flag).output().is_ok_and(|output| output.status.success())
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    if !installed("systemd-analyze", &["--version"]) {
        phi3d_tests::skip("systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // verify checks that ExecStart= exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let units = repository().join("deploy/systemd");
    let service = std::fs::read_to_string(units.join("phi3d.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/phi3d serve"), "{service}");
    std::fs::write(dir.path().join("phi3d.service"), service.replace("/usr/bin/phi3d", PHI3D)).unwrap();
    std::fs::copy(units.join("phi3d.socket"), dir.path().join("phi3d.socket")).unwrap();
    let worker = std::fs::read_to_string(repository().join("deploy/rpc/phi3d-rpc-worker.service")).unwrap();
    assert!(worker.contains("ExecStart=/usr/bin/phi3d rpc-worker") && worker.contains("IPAddressDeny=any"), "{worker}");
    std::fs::write(dir.path().join("phi3d-rpc-worker.service"), worker.replace("/usr/bin/phi3d", PHI3D)).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("phi3d.service"))
        .arg(dir.path().join("phi3d.socket"))
        .arg(dir.path().join("phi3d-rpc-worker.service"))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "systemd-analyze verify failed: {said}");
    assert!(!said.contains("phi3d."), "systemd-analyze verify found problems: {said}");
}

#[test]
fn the_debian_package_holds_the_binaries_units_config_and_manifests() {
    if !installed("cargo", &["deb", "--version"]) {
        phi3d_tests::skip("cargo-deb is not installed (cargo install cargo-deb --locked)");
        return;
    }
    let release = Path::new(PHI3D).parent().unwrap();
    let plugins = ["phi3d-plugin-clock", "phi3d-plugin-homeassistant"];
    if let Some(missing) = plugins.iter().find(|plugin| !release.join(plugin).is_file()) {
        phi3d_tests::skip(format!("{missing} is not built; cargo test --release --workspace builds it"));
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let built = Command::new(repository().join("deploy/build-deb.sh"))
        .arg(out.path())
        .env("CARGO_TARGET_DIR", release.parent().unwrap())
        .output()
        .unwrap();
    assert!(built.status.success(), "build-deb.sh failed: {}", String::from_utf8_lossy(&built.stderr));
    let package = std::fs::read_dir(out.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .expect("a .deb was written");

    let contents = dpkg_deb(&["-c"], &package);
    for file in [
        "./usr/bin/phi3d",
        "./usr/bin/phi3d-plugin-clock",
        "./usr/bin/phi3d-plugin-homeassistant",
        "./usr/lib/systemd/system/phi3d.service",
        "./usr/lib/systemd/system/phi3d.socket",
        "./etc/phi3d/phi3d.toml",
        "./etc/phi3d/plugins.d/clock.toml",
        "./etc/phi3d/plugins.d/homeassistant.toml",
    ] {
        assert!(contents.lines().any(|line| line.ends_with(&format!(" {file}"))), "{file} missing:\n{contents}");
    }
    let binary = contents.lines().find(|line| line.ends_with(" ./usr/bin/phi3d")).unwrap();
    assert!(binary.starts_with("-rwxr-xr-x 0/0"), "{binary}");
    let secret = contents.lines().find(|line| line.ends_with("homeassistant.toml")).unwrap();
    assert!(secret.starts_with("-rw-r-----"), "the manifest that holds HA_TOKEN is not world-readable: {secret}");

    let info = dpkg_deb(&["-I"], &package);
    assert!(info.contains("Package: phi3d"), "{info}");
    assert!(info.contains("adduser"), "the postinst needs adduser: {info}");
    let conffiles = dpkg_deb(&["--ctrl-tarfile"], &package);
    for conffile in ["/etc/phi3d/phi3d.toml", "/etc/phi3d/plugins.d/clock.toml"] {
        assert!(conffiles.contains(conffile), "{conffile} is not a conffile");
    }
    assert!(conffiles.contains("adduser --system --group"), "the postinst creates the phi3d user");
    assert!(conffiles.contains("daemon-reload"), "the postinst reloads systemd");
}

/// `dpkg-deb ARGS PACKAGE`'s output (binary parts as lossy text).
fn dpkg_deb(args: &[&str], package: &Path) -> String {
    let output = Command::new("dpkg-deb").args(args).arg(package).output().expect("dpkg-deb runs");
    assert!(output.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
