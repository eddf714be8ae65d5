#!/usr/bin/env bash
# Checks that llama.cpp's CUDA backend, as the `cuda` feature builds it, compiles for a Jetson
# Orin (sm_87), on a machine without a GPU or a CUDA installation: NVIDIA's CUDA 13 toolkit is
# taken from PyPI (the nvidia-cuda-nvcc, -crt, -cccl, -runtime and nvidia-cublas wheels hold
# nvcc, its headers and the shared libraries), then llama.cpp's ggml-cuda library is configured
# and built from the llama.cpp sources of the llama-cpp-sys-2 crate phi3d links, with the
# options phi3d's build gives it. Prints each step's time.
#
#   deploy/check-cuda.sh [ARCHS]    # default ARCHS: 87 (Orin); CMake's CUDA architectures list
#
# Needs python3-venv, cmake, g++ and about 3 GB in target/cuda (the toolkit is 1.1 GB).
# It builds the backend library, not phi3d: the wheels hold no libcuda.so (it comes with the
# driver, on a Jetson with JetPack), so the check builds without CUDA's virtual memory
# management (GGML_CUDA_NO_VMM) and links nothing against the driver. On a Jetson, build phi3d
# itself there: `cargo build --release --features cuda` with JetPack's toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${1:-87}"
work="${CARGO_TARGET_DIR:-target}/cuda"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
now() { date +%s; }

# The toolkit, from PyPI, into a virtual environment; then a tree CMake's FindCUDAToolkit
# recognises (bin/nvcc, include, lib with the unversioned library names it links by).
started=$(now)
if [ ! -x "$work/venv/bin/pip" ]; then
    python3 -m venv "$work/venv"
fi
"$work/venv/bin/pip" install -q "nvidia-cuda-nvcc==13.*" "nvidia-cuda-crt==13.*" "nvidia-cuda-cccl==13.*" \
    "nvidia-cuda-runtime==13.*" "nvidia-cublas==13.*"
cu13="$(echo "$work"/venv/lib/python3*/site-packages/nvidia/cu13)"
toolkit="$work/toolkit"
rm -rf "$toolkit"
mkdir -p "$toolkit/lib"
ln -s lib "$toolkit/lib64"
ln -s "$cu13/bin" "$toolkit/bin"
ln -s "$cu13/include" "$toolkit/include"
ln -s "$cu13/nvvm" "$toolkit/nvvm"
for library in "$cu13"/lib/*; do
    ln -s "$library" "$toolkit/lib/"
    case "$library" in
        *.so.*) ln -sf "$library" "$toolkit/lib/$(basename "${library%%.so.*}").so" ;;
    esac
done
"$toolkit/bin/nvcc" --version | tail -2
echo "toolkit: $(( $(now) - started )) s"

# The llama.cpp sources phi3d builds (the llama-cpp-sys-2 version in Cargo.lock).
version="$(awk '/^name = "llama-cpp-sys-2"/ { getline; gsub(/[^0-9.]/, ""); print }' Cargo.lock)"
sources="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$version"/llama.cpp 2>/dev/null | head -1)"
if [ -z "$sources" ]; then
    cargo fetch --locked >/dev/null
    sources="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"llama-cpp-sys-2-$version"/llama.cpp | head -1)"
fi
echo "llama.cpp from llama-cpp-sys-2 $version"

started=$(now)
build="$work/build-$archs"
# As llama-cpp-sys-2 configures it for `cuda` with `dynamic-backends` (shared libraries, NCCL
# off), for the architectures asked, without the driver's virtual memory management.
cmake -S "$sources" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    -DCUDAToolkit_ROOT="$toolkit" -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" \
    -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CPU=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF >"$work/configure.log"
grep -E 'CUDA Toolkit found|CUDA host compiler|Using CUDA architectures' "$work/configure.log" || true
echo "configure: $(( $(now) - started )) s"

started=$(now)
units="$(find "$sources/ggml/src/ggml-cuda" -name '*.cu' | wc -l)"
echo "building ggml-cuda ($units CUDA sources in the tree) on $(nproc) cores ..."
cmake --build "$build" --target ggml-cuda -j "$(nproc)"
echo "ggml-cuda built in $(( $(now) - started )) s:"
find "$build" -name 'libggml-cuda*.so' -exec ls -l {} \;
