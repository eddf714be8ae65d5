#!/usr/bin/env bash
# Runs the aarch64 build from `deploy/build-portable.sh aarch64` under qemu-user, once per emulated CPU:
# `phi3d doctor` must name the llama.cpp CPU variant it picked (a dotprod one on a Cortex-A76,
# as on a Pi 5; armv8.0 on a Cortex-A72, as on a Pi 4, where a dotprod instruction would die
# with SIGILL), then `phi3d serve` on a tiny generated model must answer one gRPC chat
# (`phi3d chat`, itself the aarch64 binary) and one Ollama-API chat (POST /api/chat, curl).
#
#   deploy/smoke-aarch64.sh [BUNDLE]   # default: $CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/bundle
#
# Needs qemu-user, curl and the aarch64 libraries (libc6-dev-arm64-cross, libgomp1 from
# gcc-aarch64-linux-gnu). The model comes from the host's phi3d-gen-model
# (PHI3D_GEN_MODEL, default $CARGO_TARGET_DIR/release/phi3d-gen-model, built when missing).
# PHI3D_SMOKE_MODEL names a tiny GGUF to use instead. PHI3D_SMOKE_CPUS picks the CPUs (default
# "cortex-a76 cortex-a72"). Prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
bundle="${1:-$target_dir/aarch64-unknown-linux-gnu/release/bundle}"
cpus="${PHI3D_SMOKE_CPUS:-cortex-a76 cortex-a72}"
gen_model="${PHI3D_GEN_MODEL:-$target_dir/release/phi3d-gen-model}"
sysroot=/usr/aarch64-linux-gnu

[ -x "$bundle/bin/phi3d" ] || { echo "$bundle/bin/phi3d is missing: run deploy/build-portable.sh aarch64 first" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 is missing: apt-get install qemu-user" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is missing: apt-get install curl" >&2; exit 1; }
if [ -z "${PHI3D_SMOKE_MODEL:-}" ] && [ ! -x "$gen_model" ]; then
    cargo build --release -p phi3d-tests --bin phi3d-gen-model
fi

work="$(mktemp -d)"
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
if [ -n "${PHI3D_SMOKE_MODEL:-}" ]; then
    cp "$PHI3D_SMOKE_MODEL" "$work/tiny.gguf"
else
    "$gen_model" --shape tiny "$work/tiny.gguf" >/dev/null
fi
: >"$work/phi3d.toml"
mkdir -p "$work/plugins"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

failures=0
fail() { echo "FAIL ($cpu): $*" >&2; failures=$((failures + 1)); }

for cpu in $cpus; do
    run() { qemu-aarch64 -L "$sysroot" -cpu "$cpu" "$bundle/bin/phi3d" "$@"; }
    case "$cpu" in
        cortex-a76 | cortex-a78* | cortex-a55 | neoverse-n1) expect='armv8\.2_[12]' ;;
        cortex-a72 | cortex-a53 | cortex-a57) expect='armv8\.0_1' ;;
        *) expect='.' ;;
    esac
    echo "== $cpu"

    start=$(now)
    # The model is a file: doctor reads its shape. Doctor's exit status is not the point here
    # (under qemu the sandbox's kernel features are missing, as they would be on an old kernel).
    doctor="$(run doctor --config "$work/phi3d.toml" --model "$work/tiny.gguf" --plugins-dir "$work/plugins" \
        --prompt-cache-dir "$work/cache" --listen 127.0.0.1:0 2>&1 || true)"
    echo "$doctor" | grep -E '^(ok|note|warn|FAIL) +(cpu|board|sandbox)' || true
    echo "doctor: $(since "$start") s"
    variant="$(echo "$doctor" | sed -n 's/.*CPU variant \([^ ,]*\).*/\1/p' | head -1)"
    if [ -z "$variant" ]; then
        fail "doctor names no CPU variant"
        echo "$doctor" >&2
    elif ! echo "$variant" | grep -Eq "^$expect$"; then
        fail "doctor picked CPU variant $variant, expected $expect"
    else
        echo "ok: CPU variant $variant"
    fi
    if grep -qi 'illegal instruction' <<<"$doctor"; then fail "illegal instruction in doctor"; fi

    grpc="127.0.0.1:$(free_port)"
    http="127.0.0.1:$(free_port)"
    start=$(now)
    # Not through run(): $! must be qemu itself, for the kill below.
    PHI3D_LOG=info PHI3D_TOKEN_FILE="$work/tokens.toml" \
        qemu-aarch64 -L "$sysroot" -cpu "$cpu" "$bundle/bin/phi3d" serve --config "$work/phi3d.toml" --model "$work/tiny.gguf" --listen "$grpc" --http-listen "$http" \
        --threads 2 --ctx-size 512 --plugins-dir "$work/plugins" --prompt-cache-dir "$work/cache" \
        --sandbox-require best-effort >"$work/serve-$cpu.log" 2>&1 &
    server_pid=$!
    warm=
    for _ in $(seq 1 240); do
        if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
        # Captured, then searched: `status | grep -q` under pipefail fails whenever grep quits
        # before status has written its last line.
        if status="$(run status --addr "http://$grpc" 2>/dev/null)" && grep -q '^kv cells' <<<"$status"; then warm=1; break; fi
        sleep 0.5
    done
    if [ -z "$warm" ]; then
        fail "serve did not become warm"
        tail -30 "$work/serve-$cpu.log" >&2
    else
        echo "serve warm: $(since "$start") s"
        run status --addr "http://$grpc" | grep -E '^(cpu|board) ' || true
        start=$(now)
        if reply="$(run chat --addr "http://$grpc" --max-tokens 16 --seed 1 --stats "Say hello" 2>&1)"; then
            echo "grpc chat: $(since "$start") s: $(echo "$reply" | tail -1)"
        else
            fail "gRPC chat failed: $reply"
        fi
        start=$(now)
        body='{"model":"tiny","stream":false,"messages":[{"role":"user","content":"Say hello"}],"options":{"num_predict":16,"seed":1}}'
        if answer="$(curl -sS --fail-with-body --max-time 300 "http://$http/api/chat" -d "$body")" \
            && echo "$answer" | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["done"] and r["message"]["role"]=="assistant", r; print(f"""{r["eval_count"]} tokens, {r["eval_count"] / max(r["eval_duration"], 1) * 1e9:.1f} tokens/s""")' >"$work/ollama"; then
            echo "ollama /api/chat: $(since "$start") s: $(cat "$work/ollama")"
        else
            fail "Ollama-API chat failed: ${answer:-no answer}"
        fi
    fi
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    if grep -qi 'illegal instruction\|SIGILL' "$work/serve-$cpu.log"; then fail "illegal instruction in serve"; fi
done

if [ "$failures" -gt 0 ]; then
    echo "smoke test: $failures failure(s)" >&2
    exit 1
fi
echo "smoke test passed on: $cpus"
