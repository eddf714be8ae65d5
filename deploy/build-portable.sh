#!/usr/bin/env bash
# Builds phi3d for every CPU of an architecture, not only this machine's: llama.cpp's CPU
# backend is compiled once per CPU level (the `dynamic-backends` feature) and the best one the
# CPU can run is picked at run time, so one build serves
#   aarch64: a Raspberry Pi 4 (Cortex-A72, no dotprod), a Pi 5 (Cortex-A76) and a Jetson Orin
#            (Cortex-A78AE), cross-built on an x86-64 Debian or Ubuntu machine;
#   x86_64:  anything from SSE4.2 to AVX-512 (haswell, skylakex, zen4, ... variants).
#
#   deploy/build-portable.sh aarch64|x86_64 [OUT]   # default OUT: target/<triple>/release/bundle
#
# Leaves OUT/bin/phi3d (and the plugins) with OUT/lib/phi3d/ holding libllama, libggml and one
# libggml-cpu-<level>.so per CPU level; phi3d finds them beside itself (../lib/phi3d).
# The aarch64 build needs, once:
#   sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \
#       cmake clang libclang-dev protobuf-compiler
#   rustup target add aarch64-unknown-linux-gnu
# Then deploy/smoke-aarch64.sh runs the bundle under qemu-aarch64, deploy/test-aarch64.sh runs
# the unit tests there, and deploy/build-deb-portable.sh packages either architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-}"
case "$arch" in
    aarch64)
        source deploy/cross-env.sh
        ;;
    x86_64)
        triple=x86_64-unknown-linux-gnu
        release="${CARGO_TARGET_DIR:-target}/$triple/release"
        # Naming the target keeps this build in its own folder, away from the native one, and
        # its rustflags replace .cargo/config.toml's target-cpu=native: the CPU is picked at
        # run time. The libraries are found beside the binary.
        export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C link-arg=-Wl,-rpath,$ORIGIN/../lib/phi3d'
        # As the aarch64 build (deploy/cross-env.sh): no RPC backend in the portable build.
        export GGML_RPC=OFF
        ;;
    *)
        echo "usage: deploy/build-portable.sh aarch64|x86_64 [OUT]" >&2
        exit 2
        ;;
esac
out="${2:-$release/bundle}"

started=$(date +%s)
# One invocation, so that the plugins share the daemon's build of every dependency.
cargo build --release --target "$triple" -p phi3d -p phi3d-plugin-clock -p phi3d-plugin-homeassistant \
    --features phi3d/dynamic-backends --bins

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
echo "built $out in $(( $(date +%s) - started )) s:"
ls -l "$out/bin" "$out/lib/phi3d"
