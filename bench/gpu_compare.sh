#!/usr/bin/env bash
# Ours against the original on the same GPU, alternating: image generation of the 350M preset
# with random weights in f16, at batch 1 and 32 (`rudolph bench` against
# bench/gpu_original.py, which runs rudolph 0.0.1rc1's own generate_codebooks in its FP16Module).
#
#   RUDOLPH_BIN=target/release/rudolph ORIGINAL_SITE=DIR bench/gpu_compare.sh
#
# ORIGINAL_SITE holds the original's `rudolph` and `more_itertools` packages (see
# gpu_original.py). One JSON line per run, on stdout and in $OUT_DIR/compare.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${RUDOLPH_BIN:-target/release/rudolph}
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
. bench/cuda_libs.sh
status=0
ours() {
  timeout -k 5 "$1" "$bin" bench --preset 350m --device cuda --dtype f16 --task image \
    --batch-size "$2" --images "$3" --json | python3 -c 'import json,sys
r = json.load(sys.stdin); r["implementation"] = "rudolph"; print(json.dumps(r))' || status=1
}
original() {
  timeout -k 5 "$1" python3 bench/gpu_original.py --site "${ORIGINAL_SITE:?}" --runs "$2:$3" || status=1
}
{
  ours 45 1 2
  original 90 1 1
  ours 45 32 32
  original 90 32 32
} | tee "$out/compare.jsonl"
python3 - "$out/compare.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
for bs in sorted({r['batch_size'] for r in rows}):
    t = {r['implementation']: r['seconds_per_image'] for r in rows if r['batch_size'] == bs}
    line = f"batch {bs:3}: " + ", ".join(f"{k} {v:.3f} s/image" for k, v in t.items())
    if len(t) == 2:
        line += f"; original / ours = {t['original'] / t['rudolph']:.1f}x"
    print(line)
PY
exit $status
