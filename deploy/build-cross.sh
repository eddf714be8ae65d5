#!/usr/bin/env bash
# Cross-builds phi3d for the boards (Raspberry Pi 4 and 5, Jetson Orin: aarch64 Linux) on an
# x86-64 Debian or Ubuntu machine, with llama.cpp's CPU backend built for every aarch64 level
# and picked at run time (the `dynamic-backends` feature), so that one build serves a Cortex-A72
# (no dotprod), a Cortex-A76 and a Cortex-A78AE each with its best kernels.
#
#   deploy/build-cross.sh [OUT]   # default OUT: $CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/bundle
#
# Needs, once:
#   sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \
#       cmake clang libclang-dev protobuf-compiler
#   rustup target add aarch64-unknown-linux-gnu
# Leaves OUT/bin/phi3d (and the plugins) with OUT/lib/phi3d/ holding libllama, libggml and one
# libggml-cpu-<level>.so per aarch64 level; phi3d finds them beside itself (../lib/phi3d).
# Try it here: qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a76 OUT/bin/phi3d doctor
# (deploy/smoke-aarch64.sh does, and serves a chat); deploy/build-deb-boards.sh packages it.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=aarch64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-target}"
release="$target_dir/$triple/release"
out="${1:-$release/bundle}"

for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
    command -v "$tool" >/dev/null || {
        echo "$tool is missing: sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross" >&2
        exit 1
    }
done
rustup target list --installed 2>/dev/null | grep -qx "$triple" || {
    echo "the Rust target is missing: rustup target add $triple" >&2
    exit 1
}

# Debian bookworm's cross GCC 12 knows neither -march=armv9.2-a nor +sme, which llama.cpp asks
# for its two SME variants. No board phi3d is for has SME; those two variants are built as
# armv9-a (which implies SVE2, as every armv9.2 CPU has), still correct on a CPU that picks them,
# without SME kernels. A newer cross compiler is used as it is.
mkdir -p "$target_dir/$triple/cross-wrappers"
wrappers="$(cd "$target_dir/$triple/cross-wrappers" && pwd)"
for tool in gcc g++; do
    real="$(command -v aarch64-linux-gnu-$tool)"
    cat >"$wrappers/aarch64-linux-gnu-$tool" <<EOF
#!/usr/bin/env bash
if echo 'int x;' | "$real" -x c -march=armv9.2-a+sme -c -o /dev/null - 2>/dev/null; then exec "$real" "\$@"; fi
args=()
for arg in "\$@"; do
    case "\$arg" in
        -march=armv9.2-a*) arg="\${arg/armv9.2-a/armv9-a}"; arg="\${arg//+sme/}" ;;
    esac
    args+=("\$arg")
done
exec "$real" "\${args[@]}"
EOF
    chmod +x "$wrappers/aarch64-linux-gnu-$tool"
done

triple_env=${triple//-/_}
export "CC_$triple_env=$wrappers/aarch64-linux-gnu-gcc"
export "CXX_$triple_env=$wrappers/aarch64-linux-gnu-g++"
export "AR_$triple_env=aarch64-linux-gnu-ar"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# bindgen reads the aarch64 headers, not the host's.
export "BINDGEN_EXTRA_CLANG_ARGS_$triple_env=--sysroot=/usr/aarch64-linux-gnu"
# Not target-cpu=native (.cargo/config.toml's default for builds on the machine itself): the
# CPU is picked at run time. The libraries are found beside the binary.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C link-arg=-Wl,-rpath,$ORIGIN/../lib/phi3d'

cargo build --release --target "$triple" -p phi3d --features dynamic-backends --bin phi3d
cargo build --release --target "$triple" -p phi3d-plugin-clock -p phi3d-plugin-homeassistant

# llama-cpp-sys-2 leaves libllama, libggml and libggml-base in OUT_DIR/lib (or lib64) and the
# CPU backends in OUT_DIR/backends; the newest such build is the one just linked.
sys_out="$(ls -dt "$release"/build/llama-cpp-sys-2-*/out/backends 2>/dev/null | head -1)"
[ -n "$sys_out" ] || { echo "no llama-cpp-sys-2 build with backends under $release/build" >&2; exit 1; }
sys_out="$(dirname "$sys_out")"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib/phi3d"
cp "$release/phi3d" "$release/phi3d-plugin-clock" "$release/phi3d-plugin-homeassistant" "$out/bin/"
for dir in lib lib64; do
    if [ -d "$sys_out/$dir" ]; then
        # Only the names the binary asks for (libllama.so.0, ...), not their symlinked twins.
        find "$sys_out/$dir" -maxdepth 1 -regex '.*/lib[^/]*\.so\.[0-9]+' -exec cp -L {} "$out/lib/phi3d/" \;
    fi
done
cp -L "$sys_out"/backends/*.so "$out/lib/phi3d/"
ls "$out"/lib/phi3d/libggml-cpu-*.so >/dev/null
echo "built $out:"
ls -l "$out/bin" "$out/lib/phi3d"
