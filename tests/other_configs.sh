#!/usr/bin/env bash
# Makes fixture folders for other tiny configurations with the ORIGINAL code, then runs the whole
# test suite on each of them and on the shared folder. Every parity test must pass on any folder
# that make_fixtures.py makes, not only on the shared one.
#
#   tests/other_configs.sh            # every configuration in tests/configs/
#   tests/other_configs.sh deep-long  # only these
#
# Needs the original's environment (../shared/bench/setup_reference.sh installs it, about 3 GB,
# once) and takes about 10 minutes a configuration on two cores. Folders go to
# $RUDOLPH_OTHER_FIXTURES (default target/other-fixtures) and are made again only when their
# configuration changed.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=$(cd .. && pwd)/shared
env=${RUDOLPH_REFERENCE_ENV:-$HOME/.cache/rudolph-reference}
out=${RUDOLPH_OTHER_FIXTURES:-target/other-fixtures}
RUDOLPH_REFERENCE_ENV=$env bash "$shared/bench/setup_reference.sh"

# name and seed of each configuration; the seeds are ones where every golden of make_fixtures.py
# can be made (with some seeds the original's generate_texts finds only empty texts and raises)
declare -A seeds=([wide-short]=5 [deep-long]=7 [two-layer]=12)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${!seeds[@]}")

cargo build --release --tests --locked
failed=()
for name in "${names[@]}"; do
    cfg=tests/configs/$name.json
    [ -f "$cfg" ] || { echo "no configuration $cfg"; exit 2; }
    seed=${seeds[$name]:-0}
    dir=$out/$name
    stamp="$(sha256sum "$cfg" | cut -c1-16)-seed$seed"
    if [ "$(cat "$dir/.made-from" 2>/dev/null)" != "$stamp" ]; then
        echo "== making $dir (seed $seed) with the original code"
        rm -rf "$dir" && mkdir -p "$dir"
        (cd "$shared/fixtures-tools" &&
            "$env/bin/python" make_fixtures.py "$OLDPWD/$dir" --seed "$seed" --config-json "$OLDPWD/$cfg" &&
            "$env/bin/python" make_train_goldens.py "$OLDPWD/$dir") > "$dir.log" 2>&1 ||
            { echo "making $dir failed: see $dir.log"; exit 1; }
        echo "$stamp" > "$dir/.made-from"
    fi
    echo "== the suite on $dir"
    RUDOLPH_FIXTURES=$dir cargo test --release --locked --no-fail-fast || failed+=("$name")
done
echo "== the suite on the shared folder"
RUDOLPH_FIXTURES=$shared/fixtures cargo test --release --locked --no-fail-fast || failed+=(shared)
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed on: ${failed[*]}"
    exit 1
fi
echo "the suite passed on: ${names[*]} shared"
