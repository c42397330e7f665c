#!/usr/bin/env bash
# Check and time Triton kernel sections on a GPU in one call. Triton compiles one kernel at a time and a cold cache
# makes compiling most of such a run, so the kernels are first compiled by parallel processes: one per shape
# calling every timed path once (kernels.py --warm-only) while the checks against the torch path run one case per
# process (gpu_check.py --jobs); then the timed tables.
#   bash benchmarks/kernels_gpu.sh OUT [SECTIONS (selective_scan)] [SHAPES (8x2048,1x65536)] [EXTRA kernels.py ARGS]
set -u
out=${1:?usage: kernels_gpu.sh OUT [SECTIONS] [SHAPES] [EXTRA ARGS]}
sections=${2:-selective_scan}
shapes=${3:-8x2048,1x65536}
extra=${4:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
for shape in ${shapes//,/ }; do
  python3 benchmarks/kernels.py --warm-only --no-sweep --no-ssd-sweep --sections "$sections" --shapes "$shape" \
    --out "$out/warm-$shape" > "$out/warm-$shape.log" 2>&1 &
done
python3 benchmarks/gpu_check.py --out "$out" --skip-tests --skip-bench --only "$sections" --jobs 8 \
  > "$out/check.log" 2>&1
wait
echo "compiled and checked in $(( $(date +%s) - start )) s" >> "$out/check.log"
tail -n 2 "$out/check.log"
# shellcheck disable=SC2086
python3 benchmarks/kernels.py --sections "$sections" --shapes "$shapes" --out "$out" $extra 2>&1 | tee "$out/kernels.log"
