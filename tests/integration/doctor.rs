//! `phi3d doctor`: what the device offers and whether the configured set-up fits, with a
//! non-zero exit when it does not.

use std::path::Path;

use crate::common::{PHI3D, tiny_model};

fn doctor(extra: &[&str]) -> (bool, String) {
    let model = tiny_model();
    let mut args = vec!["doctor", "--config", "/dev/null", "--model", model.to_str().unwrap()];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let tokens = std::env::temp_dir().join(format!("phi3d-doctor-no-tokens-{}", std::process::id()));
    let output = phi3d_tests::harness::run(Path::new(PHI3D), &args, &[("PHI3D_TOKEN_FILE", tokens.to_str().unwrap())]);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn a_set_up_that_fits_reports_every_part_and_exits_zero() {
    let (fits, report) = doctor(&[]);
    assert!(fits, "{report}");
    let topics = [
        "sandbox: ",
        "cpu: llama.cpp kernels use",
        "memory: ctx_size 4096 with kv_type f16 needs",
        "listen: 127.0.0.1:0: loopback only",
        "systemd: ",
    ];
    for topic in topics {
        assert!(report.contains(topic), "no {topic:?} in:\n{report}");
    }
    assert!(report.contains("landlock") || report.contains("Landlock"), "{report}");
    assert!(report.lines().any(|line| line == "the configured set-up fits this device"), "{report}");
}

#[test]
fn a_set_up_that_does_not_fit_is_named_and_exits_non_zero() {
    let (fits, report) = doctor(&["--ctx-size", "4000000000"]);
    assert!(!fits, "{report}");
    let memory = report.lines().find(|line| line.starts_with("FAIL  memory:")).unwrap_or_else(|| panic!("{report}"));
    assert!(memory.contains("this fits: --ctx-size"), "{memory}");
    assert!(report.contains("error: the configured set-up does not fit this device"), "{report}");

    let (fits, report) = doctor(&["--gpu-layers", "8"]);
    if cfg!(not(any(feature = "cuda", feature = "vulkan"))) {
        assert!(!fits && report.contains("FAIL  gpu: gpu_layers is 8"), "{report}");
    }

    let output = phi3d_tests::harness::run(
        Path::new(PHI3D),
        &["doctor", "--config", "/dev/null", "--model", "/nonexistent/model.gguf"],
        &[],
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success() && report.contains("FAIL  model:"), "{report}");
}

#[test]
fn a_network_listener_is_reported_as_reachable_without_credentials() {
    let line = |report: &str| {
        report.lines().find(|line| line.contains("listen: 0.0.0.0:0")).unwrap_or_else(|| panic!("{report}")).to_owned()
    };
    let (fits, report) = doctor(&["--listen", "0.0.0.0:0"]);
    let listen = line(&report);
    assert!(!fits && listen.starts_with("FAIL") && listen.contains("refuses to start"), "{listen}");
    let (_, report) = doctor(&["--listen", "0.0.0.0:0", "--allow-unauthenticated-network"]);
    let listen = line(&report);
    assert!(listen.starts_with("warn") && listen.contains("without credentials"), "{listen}");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let (_, report) = doctor(&["--listen", "0.0.0.0:0", "--tls-client-ca", ca.to_str().unwrap()]);
    assert!(line(&report).contains("callers need a client certificate"), "{report}");
}
