#!/usr/bin/env bash
# Builds the portable Debian package of one architecture (arm64: Raspberry Pi 4 and 5, Jetson
# Orin; amd64: any x86-64 CPU) from the bundle deploy/build-portable.sh left, into the folder
# given (default $CARGO_TARGET_DIR/debian), then checks what it holds: the package is
# daemon/Cargo.toml's `portable` variant, the files of deploy/build-deb.sh's package plus
# llama.cpp's libraries, one CPU backend per level, in /usr/lib/phi3d.
#
#   deploy/build-deb-portable.sh aarch64|x86_64 [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    aarch64) triple=aarch64-unknown-linux-gnu deb_arch=arm64 baseline=armv8.0_1 ;;
    x86_64) triple=x86_64-unknown-linux-gnu deb_arch=amd64 baseline=x64 ;;
    *) echo "usage: deploy/build-deb-portable.sh aarch64|x86_64 [OUT]" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"
out="${2:-$target/debian}"
bundle="$target/$triple/release/bundle"
for file in "$target/$triple/release/phi3d" "$target/$triple/release/phi3d-plugin-clock" \
    "$target/$triple/release/phi3d-plugin-homeassistant" "$bundle/lib/phi3d/libllama.so.0"; do
    if [ ! -e "$file" ]; then
        echo "$file is missing: run deploy/build-portable.sh $1 first" >&2
        exit 1
    fi
done
mkdir -p "$out"
deb="$(cargo deb -p phi3d --variant portable --target "$triple" --no-build --output "$out" | tail -1)"
echo "$deb"
info="$(dpkg-deb --info "$deb")"
contents="$(dpkg -c "$deb")"
echo "$info" | grep -E '^ (Package|Architecture|Depends|Installed-Size):'
echo "$contents"

# What a board needs to start: the binaries, the units, the config, llama.cpp's libraries and
# at least the baseline CPU level (a Pi 4's, or an x86-64 CPU without AVX).
missing=()
for file in ./usr/bin/phi3d ./usr/bin/phi3d-plugin-clock ./usr/bin/phi3d-plugin-homeassistant \
    ./usr/lib/systemd/system/phi3d.service ./usr/lib/systemd/system/phi3d.socket ./etc/phi3d/phi3d.toml \
    ./usr/lib/phi3d/libllama.so.0 ./usr/lib/phi3d/libggml.so.0 ./usr/lib/phi3d/libggml-base.so.0 \
    "./usr/lib/phi3d/libggml-cpu-$baseline.so"; do
    grep -q " $file\$" <<<"$contents" || missing+=("$file")
done
grep -q "^ Architecture: $deb_arch\$" <<<"$info" || missing+=("Architecture: $deb_arch")
grep -q "^ Depends:.*libgomp1" <<<"$info" || missing+=("Depends: libgomp1")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "the package lacks: ${missing[*]}" >&2
    exit 1
fi
echo "package checked: $(echo "$contents" | grep -c 'libggml-cpu-') CPU levels"
