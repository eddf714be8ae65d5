#!/usr/bin/env bash
# Builds the boards' Debian package (arm64: Raspberry Pi 4 and 5, Jetson Orin) from the cross
# build deploy/build-cross.sh left, into the folder given (default $CARGO_TARGET_DIR/debian),
# and lists its contents. The package is daemon/Cargo.toml's `boards` variant: the x86-64
# package's files plus llama.cpp's libraries in /usr/lib/phi3d.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=aarch64-unknown-linux-gnu
target="${CARGO_TARGET_DIR:-target}"
out="${1:-$target/debian}"
bundle="$target/$triple/release/bundle"
for file in "$target/$triple/release/phi3d" "$target/$triple/release/phi3d-plugin-clock" \
    "$target/$triple/release/phi3d-plugin-homeassistant" "$bundle/lib/phi3d/libllama.so.0"; do
    if [ ! -e "$file" ]; then
        echo "$file is missing: run deploy/build-cross.sh first" >&2
        exit 1
    fi
done
mkdir -p "$out"
deb="$(cargo deb -p phi3d --variant boards --target "$triple" --no-build --output "$out" | tail -1)"
echo "$deb"
dpkg-deb --info "$deb" | grep -E '^ (Package|Architecture|Depends|Installed-Size):'
dpkg -c "$deb"
