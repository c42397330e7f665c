#!/usr/bin/env bash
# Compare selective-scan TUNING settings on a GPU in one call: each setting's kernels are compiled by its own
# process while the scan's checks against the torch path run (default settings), then kernels.py times the list in
# two interleaved rounds at 8 x 2048 and reports the scan table with the fastest setting.
#   bash benchmarks/scan_sweep_gpu.sh OUT '[{}, {"BWD_MAXNREG": 168}, ...]'
# With CHECK_TESTS="tests/FILE.py ..." those tests run natively instead of the checks, each test in its own process
# (8 at a time; PASS/FAIL per test in OUT/pytest.log).
set -u
out=${1:?usage: scan_sweep_gpu.sh OUT JSON_LIST}
list=${2:?usage: scan_sweep_gpu.sh OUT JSON_LIST}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
settings=$(python3 -c 'import json, sys; sys.path.insert(0, "benchmarks"); import kernels
print("\n".join(json.dumps(t) for t in kernels.parse_tuning_list(sys.argv[1])))' "$list") || exit 2
i=0
while IFS= read -r setting; do
  python3 benchmarks/kernels.py --warm-only --no-sweep --sections selective_scan --shapes 8x2048 \
    --scan-tuning "$setting" --out "$out/warm-$i" > "$out/warm-$i.log" 2>&1 &
  i=$((i + 1))
done <<< "$settings"
if [ -n "${CHECK_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  python3 -m pytest -q --collect-only -p no:cacheprovider $CHECK_TESTS 2>/dev/null | grep "::" \
    | xargs -P 8 -I{} sh -c 'python3 -m pytest -q -p no:cacheprovider "{}" > /dev/null 2>&1 && echo "PASS {}" || echo "FAIL {}"' \
    > "$out/pytest.log"
  echo "$(grep -c '^PASS' "$out/pytest.log") passed, $(grep -c '^FAIL' "$out/pytest.log") failed: $CHECK_TESTS" \
    > "$out/check.log"
else
  python3 benchmarks/gpu_check.py --out "$out" --skip-tests --skip-bench --only selective_scan --jobs 8 \
    > "$out/check.log" 2>&1
fi
wait
echo "compiled and checked in $(( $(date +%s) - start )) s ($i settings)" >> "$out/check.log"
tail -n 12 "$out/check.log"
python3 benchmarks/kernels.py --sections selective_scan --shapes 8x2048 --scan-sweep "$list" --out "$out" 2>&1 \
  | tee "$out/kernels.log"
