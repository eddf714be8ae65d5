#!/usr/bin/env bash
# Cross-builds the project's unit tests for aarch64 and runs them under qemu-aarch64 as a
# Cortex-A72 (a Pi 4: armv8.0, no dotprod), so that the Rust code is proven on the boards'
# architecture, not only on this machine's. The sandbox's tests are skipped: qemu-user does not
# emulate Landlock, seccomp filters or user namespaces, and those tests ask the kernel for them
# (the sandbox's report of them missing is what deploy/smoke-aarch64.sh sees). Extra arguments
# go to the test binaries (a filter, --nocapture).
#
#   deploy/test-aarch64.sh [-- TEST ARGS]
#
# Needs what `deploy/build-portable.sh aarch64` needs, and qemu-user; shares its build folder, so
# after it only the test binaries are compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/cross-env.sh
[ "${1:-}" = "--" ] && shift
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 is missing: apt-get install qemu-user" >&2; exit 1; }

# llama.cpp's libraries are found in the build's own folders (the test binaries are not beside
# a lib/phi3d): its output lib folder through the loader, the CPU backends through the path
# llama-cpp-sys-2 records at build time.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu cortex-a72"
packages=(-p phi3d -p phi3d-plugin-clock -p phi3d-plugin-homeassistant --features phi3d/dynamic-backends --lib)
cargo test --release --target "$triple" "${packages[@]}" --no-run
sys_out="$(dirname "$(ls -dt "$release"/build/llama-cpp-sys-2-*/out/backends | head -1)")"
libs="$(find "$sys_out" -maxdepth 2 -name 'libllama.so*' -printf '%h\n' | head -1)"
export QEMU_SET_ENV="LD_LIBRARY_PATH=$(cd "$libs" && pwd)"

started=$(date +%s)
cargo test --release --target "$triple" "${packages[@]}" -- --skip sandbox:: "$@"
echo "unit tests under qemu-aarch64 (cortex-a72): $(( $(date +%s) - started )) s"
