#!/usr/bin/env bash
# Sourced (not run) by deploy/build-portable.sh and deploy/test-aarch64.sh: checks the aarch64
# cross toolchain and exports what a cross build of phi3d for aarch64-unknown-linux-gnu needs.
# Sets `triple` and `release` (the target's release folder) for the script that sources it;
# expects to be sourced from the repository root.
triple=aarch64-unknown-linux-gnu
# The portable builds leave llama.cpp's RPC backend out (.cargo/config.toml turns it on for
# builds from source); the package's binary refuses rpc_workers and rpc-worker, saying so.
export GGML_RPC=OFF
target_dir="${CARGO_TARGET_DIR:-target}"
release="$target_dir/$triple/release"

for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
    command -v "$tool" >/dev/null || {
        echo "$tool is missing: sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross" >&2
        exit 1
    }
done
grep -qx "$triple" <<<"$(rustup target list --installed 2>/dev/null)" || {
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
