#!/usr/bin/env bash
# Builds the Debian package (cargo deb) from the release binaries already built by
# `cargo build --release --workspace`, into the folder given (default target/debian).
# The package's contents are listed in daemon/Cargo.toml, [package.metadata.deb].
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
out="${1:-$target/debian}"
for binary in phi3d phi3d-plugin-clock phi3d-plugin-homeassistant; do
    if [ ! -x "$target/release/$binary" ]; then
        echo "$target/release/$binary is missing: run cargo build --release --workspace first" >&2
        exit 1
    fi
done
mkdir -p "$out"
cargo deb -p phi3d --no-build --output "$out"
