#!/usr/bin/env bash
# GPU figures for the README, in one run: the card and its ceilings (PyTorch, where installed),
# the parity suites on the GPU, then seconds per image of the 350M preset at batch 1 and 32.
#
#   cargo build --release --features cuda && bench/gpu.sh
#
# Prebuilt binaries (a machine without Rust): RUDOLPH_BIN=path/to/rudolph and
# RUDOLPH_TESTS="path/to/model-test path/to/pipelines-test" (from `cargo test --release
# --features cuda --no-run`); RUDOLPH_FIXTURES as for the tests. Results land in $OUT_DIR.
# From `PACK=1 bench/build_cuda.sh`'s pack:
#   (cd .devpack && tar xJf pack.tar.xz) && RUDOLPH_BIN=.devpack/rudolph \
#   RUDOLPH_TESTS=".devpack/model .devpack/pipelines" RUDOLPH_FIXTURES=$PWD/.devpack/fixtures bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${RUDOLPH_BIN:-target/release/rudolph}
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
status=0

# The CUDA 13 libraries the binaries link (PyTorch's pip packages carry them too): added to the
# library path where the loader does not find them by itself.
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
  ldconfig -p 2>/dev/null | grep -q "$lib" && continue
  found=$(find /usr/local/nvidia /usr/local/cuda /usr/lib/x86_64-linux-gnu /opt -name "$lib" 2>/dev/null | head -1)
  [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
ldd "$bin" | grep 'not found' && status=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"

# Ceilings: a large bf16 matrix product and a device-to-device copy (bytes read + written).
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  python3 - <<'PY' | tee "$out/ceilings.txt"
import torch
def timed(f, n=10):
    for _ in range(3): f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n / 1e3
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16)
t = timed(lambda: a @ a)
print(f"bf16 matmul 8192^3: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s")
x = torch.empty(2**31, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
t = timed(lambda: y.copy_(x))
print(f"device copy 2 GiB: {2 * x.numel() / t / 1e12:.2f} TB/s (read + written)")
PY
fi

# Parity on the GPU: the same suites as on the CPU, with the model on the card.
if [ -n "${RUDOLPH_TESTS:-}" ]; then
  for t in $RUDOLPH_TESTS; do
    RUDOLPH_TEST_DEVICE=cuda "$t" 2>&1 | tee "$out/$(basename "$t").log" | grep -E '^test |test result|panicked' || status=1
    grep -q 'test result: ok' "$out/$(basename "$t").log" || status=1
  done
else
  RUDOLPH_TEST_DEVICE=cuda cargo test --release --features cuda --test model --test pipelines 2>&1 \
    | tee "$out/parity.log" | grep -E 'test result|panicked|FAILED' || status=1
fi

# Seconds per image (untimed warm-up of one batch first; see `rudolph bench`).
bench() {
  local name=$1; shift
  "$bin" bench --preset 350m --device cuda "$@" --json > "$out/$name.json" 2> "$out/$name.err" \
    || { status=1; tail -3 "$out/$name.err"; }
}
bench image_f16_b1 --task image --dtype f16 --images 4 --batch-size 1
bench image_f16_b32 --task image --dtype f16 --images 64 --batch-size 32
bench image_bf16_b32 --task image --dtype bf16 --images 64 --batch-size 32
bench image_f32_b32 --task image --dtype f32 --images 32 --batch-size 32
bench image_f16_b128 --task image --dtype f16 --images 128 --batch-size 128
bench rerank_f16_b32 --task rerank --dtype f16 --images 64 --batch-size 32
bench forward_f16_b32 --task forward --dtype f16 --images 32 --batch-size 32

python3 - "$out" <<'PY'
import glob, json, os, sys
print(f"{'run':18} {'s/image':>9} {'tokens/s':>10} {'seconds':>8} {'warm-up s':>9}")
for p in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
    name = os.path.basename(p)[:-5]
    try:
        r = json.load(open(p))
    except ValueError:
        print(f"{name:18} failed (see {name}.err)")
        continue
    print(f"{name:18} {r['seconds_per_image']:9.4f} {r['tokens_per_second']:10.0f} {r['seconds']:8.2f} {r['warmup_seconds']:9.2f}")
PY
exit $status
