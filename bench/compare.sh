#!/usr/bin/env bash
# Times ours and the original (rudolph 0.0.1rc1 on PyTorch CPU) on the same configuration, in
# alternating rounds, and prints the ratios. The original is installed by
# ../shared/bench/setup_reference.sh (into $RUDOLPH_REFERENCE_ENV, default ~/.cache/rudolph-reference).
#
#   bench/compare.sh tiny            # the fixtures' tiny model (seconds)
#   N=8 BS=8 bench/compare.sh 350m   # the real 350M configuration, random weights (many minutes)
#   DTYPES="f32 q8" bench/compare.sh 350m   # also time ours with 8-bit weights (one row per dtype)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-tiny}
n=${N:-8}; bs=${BS:-8}; rounds=${ROUNDS:-2}; threads=${THREADS:-$(nproc)}; dtypes=${DTYPES:-f32}
shared=$(cd .. && pwd)/shared
fixtures=${RUDOLPH_FIXTURES:-$shared/fixtures}
env=${RUDOLPH_REFERENCE_ENV:-$HOME/.cache/rudolph-reference}
[ -x "$env/bin/python" ] || bash "$shared/bench/setup_reference.sh"
cargo build --release --quiet
preset=$config
[ "$config" = tiny ] && preset=$fixtures/rudolph_tiny/config.json
out=$(mktemp -d)
for round in $(seq "$rounds"); do
  "$env/bin/python" "$shared/bench/ref_bench.py" --config "$config" --fixtures "$fixtures" \
    --n-images "$n" --bs "$bs" --threads "$threads" --repeats 1 --warmup 0 --out "$out/ref_$round.json" >/dev/null
  for dtype in $dtypes; do
    for task in forward image rerank; do
      ./target/release/rudolph bench --preset "$preset" --task "$task" --images "$n" --batch-size "$bs" \
        --threads "$threads" --dtype "$dtype" --json > "$out/ours_${task}_${dtype}_$round.json"
    done
  done
done
python3 - "$out" "$rounds" "$config" "$n" "$bs" "$dtypes" <<'PY'
import json, sys
out, rounds, config, n, bs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dtypes = sys.argv[6].split()
rows = {'forward': ('forward_batch', 'forward'), 'image': ('generate_codebooks_all_images', 'image'),
        'rerank': ('self_reranking_by_text_all_images', 'rerank')}
print(f"config {config}, {n} images, batch {bs}, best of {rounds} alternating rounds")
print(f"{'task':8} {'ours':5} {'original s':>11} {'ours s':>9} {'speed-up':>9} {'ours peak RSS':>14}")
for task, (ref_key, ours_task) in rows.items():
    ref = min(json.load(open(f"{out}/ref_{r}.json"))[ref_key]['min_s'] for r in range(1, rounds + 1))
    for dtype in dtypes:
        ours = [json.load(open(f"{out}/ours_{ours_task}_{dtype}_{r}.json")) for r in range(1, rounds + 1)]
        best = min(o['seconds'] for o in ours)
        rss = max(o['peak_rss_bytes'] for o in ours) / 2**20
        print(f"{task:8} {dtype:5} {ref:11.3f} {best:9.3f} {ref / best:8.1f}x {rss:11.0f} MiB")
PY
