#!/usr/bin/env bash
# Fuzzes the readers of a model folder's files for a time budget: random byte mutations of small
# checkpoints in every format (the pickle machine, torch zip and legacy files, safetensors) and
# of a data.pkl, and of the tokenizer's bpe.model, config.json, the VQGAN's .config.yml and
# pictures (PNG, JPEG, WebP), each read in full (`fuzz_file_readers` in tests/weights.rs, a proptest
# property that is ignored in the normal test run), with the crate's arithmetic overflow checks
# on. Prints a summary: cases, panics, aborts, hangs and peak memory; exits non-zero if there was
# any panic, abort or hang.
#
#   fuzz/run.sh SECONDS [ADDRESS_SPACE_MIB]   (default 4096: a runaway allocation aborts)
#
# The case that aborted or hung is copied to target/fuzz-crashes/.
set -u
cd "$(dirname "$0")/.."
secs=${1:?usage: fuzz/run.sh SECONDS [ADDRESS_SPACE_MIB]}
mem_mib=${2:-4096}

# Overflow checks on (for this crate only): in a release build an overflow would wrap silently
# into a wrong size, here it panics and counts. The switch rebuilds the crate, once each way.
build=$(cargo test --release --locked --test weights --no-run \
    --config 'profile.release.package.rudolph.overflow-checks=true' 2>&1) || {
    echo "$build" >&2
    exit 1
}
exe=$(echo "$build" | sed -n 's/.*Executable tests\/weights.rs (\(.*\))/\1/p' | tail -n 1)
[ -x "$exe" ] || { echo "cannot find the weights test binary in: $build" >&2; exit 1; }

log=$(mktemp)
times=$(mktemp)
trap 'rm -f "$log" "$times"' EXIT
timer=()
[ -x /usr/bin/time ] && timer=(/usr/bin/time -v -o "$times")
(
    ulimit -v $((mem_mib * 1024))
    RUDOLPH_FUZZ_SECONDS=$secs exec "${timer[@]}" timeout --signal=KILL $((secs + 300)) \
        "$exe" --ignored --exact fuzz_file_readers --nocapture --test-threads=1
) >"$log" 2>&1
rc=$?

panics=0 aborts=0 hangs=0
case $rc in
    0) ;;
    124 | 137) hangs=1 ;;
    101) panics=1 ;;
    *) aborts=1 ;;
esac
grep -q "PANIC" "$log" && panics=1
# The test's lines can follow libtest's "test ... " on the same line.
lines=$(sed -n 's/.*fuzz: //p' "$log")
summary=$(echo "$lines" | grep -E "^[0-9]+ cases" | tail -n 1)
cases=$(echo "$summary" | sed -n 's/^\([0-9]*\) cases.*/\1/p')
peak=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$times" 2>/dev/null)

echo "model file fuzzing: $secs s budget, ${mem_mib} MiB address space"
echo "  command:     fuzz/run.sh $*"
echo "  cases:       ${cases:-unknown (see below)}"
echo "$lines" | grep -vE "^[0-9]+ cases" | sed 's/^/    /'
[ -n "$summary" ] && echo "  result:      $summary"
echo "  panics:      $panics"
echo "  aborts:      $aborts"
echo "  hangs:       $hangs"
[ -n "$peak" ] && echo "  peak memory: $((peak / 1024)) MiB resident"
if [ $((panics + aborts + hangs)) -gt 0 ]; then
    mkdir -p target/fuzz-crashes
    case_file=target/tmp/weights-weights_fuzz_budget/case
    if [ -f "$case_file" ]; then
        keep=target/fuzz-crashes/case-$(date +%s)
        cp "$case_file" "$keep" && echo "  last input:  $keep"
    fi
    echo "--- test output (exit status $rc) ---"
    tail -n 40 "$log"
    exit 1
fi
