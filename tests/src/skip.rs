//! Skipping a test, or part of one, whose prerequisite is missing.
//!
//! On a developer's machine a missing prerequisite (the Python client libraries, Landlock,
//! seccomp, systemd-analyze, cargo-deb, haproxy, root) skips the check and says so. With
//! `PHI3D_TEST_STRICT=1`, which `.ci/run` sets, the same skip fails the test instead: a green
//! CI run then means every check ran. Every such skip goes through [`skip`].
//!
//! The one exception is data CI cannot install, the reference tokenizer in `../shared/data/`
//! outside the repository: [`skip_outside_repository`] skips it in strict mode too.

use std::fmt::Display;

/// The environment variable that turns skips into failures.
pub const STRICT: &str = "PHI3D_TEST_STRICT";

/// Whether `PHI3D_TEST_STRICT=1` is set.
pub fn strict() -> bool {
    std::env::var(STRICT).is_ok_and(|value| value == "1")
}

/// Skips what needs a missing prerequisite: prints `skipped: <reason>`, or fails the test
/// (panics at the caller) when [`strict`]. The caller returns (or leaves out the part) after.
#[track_caller]
pub fn skip(reason: impl Display) {
    skip_in(strict(), &reason);
}

#[track_caller]
fn skip_in(strict: bool, reason: &dyn Display) {
    if strict {
        panic!("{STRICT}=1 and a prerequisite is missing, so this test fails instead of skipping: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// Skips what needs data that lives outside the repository (`../shared/data/`) and that no
/// install step can provide, even in strict mode, saying so.
pub fn skip_outside_repository(reason: impl Display) {
    let mode = if strict() { " (even with PHI3D_TEST_STRICT=1: the data lives outside the repository, and CI cannot install it)" } else { "" };
    eprintln!("skipped: {reason}{mode}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_only_prints_outside_strict_mode() {
        skip_in(false, &"nothing missing, really");
    }

    #[test]
    #[should_panic(expected = "PHI3D_TEST_STRICT=1 and a prerequisite is missing, so this test fails instead of skipping: Landlock")]
    fn a_skip_fails_in_strict_mode() {
        skip_in(true, &"Landlock");
    }
}
