#!/usr/bin/env bash
# GPU figures for the README, in one run: the card, a smoke test of the built-in model, seconds
# per image of the 350M preset at batch 1 and 32, the parity suites on the GPU, then the card's
# ceilings (PyTorch, where installed). Each step is cut off so that the whole run ends within
# GPU_BUDGET_S seconds (default 480); a step that runs out of time or fails is named, and the
# run goes on with the next.
#
#   cargo build --release --features cuda && bench/gpu.sh
#
# Prebuilt binaries (a machine without Rust): RUDOLPH_BIN=path/to/rudolph and
# RUDOLPH_TESTS="path/to/model-test path/to/pipelines-test" (from `cargo test --release
# --features cuda --no-run`); RUDOLPH_FIXTURES as for the tests. Logs and JSON land in $OUT_DIR,
# and also packed as one gpu-results.tgz there (for transports that bring back few files).
# From `PACK=1 bench/build_cuda.sh`'s pack:
#   (cd .devpack && tar xJf pack.tar.xz) && RUDOLPH_BIN=.devpack/rudolph \
#   RUDOLPH_TESTS=".devpack/model .devpack/pipelines" RUDOLPH_FIXTURES=$PWD/.devpack/fixtures bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${RUDOLPH_BIN:-target/release/rudolph}
out=${OUT_DIR:-$(mktemp -d)}
work=$(mktemp -d)
mkdir -p "$out"
status=0
deadline=$((SECONDS + ${GPU_BUDGET_S:-480}))
export RUST_BACKTRACE=1

# step NAME CAP_SECONDS CMD...: runs CMD, its stdout in $work/NAME.out and stderr in
# $work/NAME.err, for at most CAP seconds and never past the deadline.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then echo "== $name: skipped, out of time"; status=1; return 1; fi
  local t0=$SECONDS
  timeout -k 5 "$cap" "$@" > "$work/$name.out" 2> "$work/$name.err"
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then status=1; tail -5 "$work/$name.out"; tail -15 "$work/$name.err"; fi
  return $rc
}

. bench/cuda_libs.sh
ldd "$bin" | grep 'not found' && status=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/card.txt"

# Smoke: the built-in model draws and captions on the card (f32, then f16).
star="большая красная звезда слева на белом фоне"
step smoke_image 90 "$bin" image "$star" --device cuda --seed 1 --force -o "$work/star.png" --json -q \
  && step smoke_caption 60 "$bin" caption "$work/star.png" --device cuda --seed 1 --json -q
step smoke_image_f16 60 "$bin" image "$star" --device cuda --dtype f16 --seed 1 --force \
  -o "$work/star_f16.png" --json -q

# Seconds per image (untimed warm-up of one batch first; see `rudolph bench`).
bench() {
  local name=$1 cap=$2; shift 2
  echo "$name" >> "$work/benches.txt"
  step "$name" "$cap" "$bin" bench --preset 350m --device cuda "$@" --json \
    && mv "$work/$name.out" "$work/$name.json"
}
bench image_f16_b1 90 --task image --dtype f16 --images 4 --batch-size 1
bench image_f16_b32 90 --task image --dtype f16 --images 64 --batch-size 32

# Parity on the GPU: the same suites as on the CPU, with the model on the card.
if [ -n "${RUDOLPH_TESTS:-}" ]; then
  for t in $RUDOLPH_TESTS; do
    step "parity_$(basename "$t")" 150 env RUDOLPH_TEST_DEVICE=cuda "$t"
    grep -E '^test .*FAILED|test result|panicked' "$work/parity_$(basename "$t").out"
  done
else
  step parity 300 env RUDOLPH_TEST_DEVICE=cuda cargo test --release --features cuda --test model --test pipelines
  grep -E 'test result|panicked|FAILED' "$work/parity.out"
fi

bench image_bf16_b32 60 --task image --dtype bf16 --images 64 --batch-size 32
bench image_f16_b128 60 --task image --dtype f16 --images 128 --batch-size 128
bench rerank_f16_b32 40 --task rerank --dtype f16 --images 64 --batch-size 32
bench forward_f16_b32 40 --task forward --dtype f16 --images 32 --batch-size 32
bench image_f32_b32 60 --task image --dtype f32 --images 32 --batch-size 32

# Ceilings: a large bf16 matrix product and a device-to-device copy (bytes read + written).
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  step ceilings 60 python3 - <<'PY'
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
  cat "$work/ceilings.out"
fi

python3 - "$work" <<'PY' | tee "$work/summary.txt"
import json, os, sys
work = sys.argv[1]
print(f"{'run':18} {'s/image':>9} {'tokens/s':>10} {'seconds':>8} {'warm-up s':>9} {'RSS MB':>7}")
for name in open(os.path.join(work, 'benches.txt')).read().split():
    try:
        r = json.load(open(os.path.join(work, name + '.json')))
    except (OSError, ValueError):
        print(f"{name:18} failed or skipped (see {name}.err)")
        continue
    print(f"{name:18} {r['seconds_per_image']:9.4f} {r['tokens_per_second']:10.0f} "
          f"{r['seconds']:8.2f} {r['warmup_seconds']:9.2f} {r['peak_rss_bytes'] / 1e6:7.0f}")
PY
[ -f "$work/smoke_caption.out" ] && { echo "-- smoke_caption"; head -c 400 "$work/smoke_caption.out"; echo; }
cp "$work"/*.png "$out/" 2>/dev/null
tar czf "$out/gpu-results.tgz" -C "$work" .
exit $status
