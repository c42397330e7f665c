#!/usr/bin/env bash
# Selective-scan forward settings on a GPU, in one call: every setting's kernels compiled by its own process while
# the scan's variant tests run natively (TESTS, a pytest -k expression), then benchmarks/scan_forward.py checks and
# times the settings in interleaved rounds.
#   bash benchmarks/scan_forward_gpu.sh OUT [SHAPES] [SETTINGS] [TESTS] [DT]
#   (SETTINGS: a JSON list, DT: benchmark,mamba-init; see scan_forward.py)
set -u
out=${1:?usage: scan_forward_gpu.sh OUT [SHAPES] [SETTINGS] [TESTS] [DT]}
shapes=${2:-1x65536,1x16384,2x8192,8x2048}
list=${3:-'[{}, {"segment_states": "scan"}, {"fwd_parts": 8}]'}
tests=${4:-split or parts or lanes}
dt=${5:-benchmark}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
i=0
while IFS= read -r setting; do
  python3 benchmarks/scan_forward.py --warm-only --settings "[$setting]" --shapes "$shapes" --out "$out/warm-$i" \
    > "$out/warm-$i.log" 2>&1 &
  i=$((i + 1))
done < <(python3 -c 'import json, sys; sys.path.insert(0, "benchmarks"); import kernels
print("\n".join(json.dumps(t) for t in kernels.parse_tuning_list(sys.argv[1])))' "$list")
python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_scan_chunk_variants.py -k "$tests" \
    2>/dev/null | grep "::" \
  | xargs -P 8 -I{} sh -c 'python3 -m pytest -q -p no:cacheprovider "{}" > /dev/null 2>&1 && echo "PASS {}" || echo "FAIL {}"' \
  > "$out/pytest.log"
wait
echo "$(grep -c '^PASS' "$out/pytest.log") passed, $(grep -c '^FAIL' "$out/pytest.log") failed; compiled and tested in" \
  "$(( $(date +%s) - start )) s" | tee "$out/check.log"
grep '^FAIL' "$out/pytest.log"
python3 benchmarks/scan_forward.py --settings "$list" --shapes "$shapes" --dt "$dt" --out "$out" 2>&1 | tee "$out/scan_forward.log"
