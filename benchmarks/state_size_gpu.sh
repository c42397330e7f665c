#!/usr/bin/env bash
# The Mamba-1 scan against SSD by state size (kernels.py's state_size section) in one GPU call: every (state size,
# scan tile) pair is compiled by its own process first (Triton compiles one kernel at a time per process), then the
# section is timed.
#   bash benchmarks/state_size_gpu.sh OUT [SHAPES (8x2048)] [STATES (16,32,64,128)]
set -u
out=${1:?usage: state_size_gpu.sh OUT [SHAPES] [STATES]}
shapes=${2:-8x2048}
states=${3:-16,32,64,128}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
tiles=$(python3 -c 'import json, sys; sys.path.insert(0, "benchmarks"); import kernels
print("\n".join(json.dumps(t) for t in kernels.SCAN_STATE_TILES))')
i=0
for n in ${states//,/ }; do
  while IFS= read -r tile; do
    if [ "$n" -le 16 ] && [ "$tile" != "{}" ]; then continue; fi
    python3 benchmarks/kernels.py --warm-only --no-sweep --sections state_size --shapes "${shapes%%,*}" \
      --states "$n" --scan-tuning "$tile" --out "$out/warm-$i" > "$out/warm-$i.log" 2>&1 &
    i=$((i + 1))
  done <<< "$tiles"
done
wait
echo "compiled in $(( $(date +%s) - start )) s by $i processes" | tee "$out/warm.log"
python3 benchmarks/kernels.py --sections state_size --shapes "$shapes" --states "$states" --out "$out" 2>&1 \
  | tee "$out/kernels.log"
