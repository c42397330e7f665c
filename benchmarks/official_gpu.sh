#!/usr/bin/env bash
# seqlab against the official Mamba package on one CUDA GPU (see benchmarks/official_mamba.py). Needs the sources
# that benchmarks/official_fetch.sh unpacks into .official/src; builds them once into .official/site (kept while the
# machine is), then runs one part per call, each under 10 minutes:
#
#   bash benchmarks/official_gpu.sh build      # compile the CUDA extensions (in the background: a later call waits)
#   bash benchmarks/official_gpu.sh scan       # selective scan fwd, fwd+bwd at 8x2048 .. 1x65536, both packages
#   bash benchmarks/official_gpu.sh generate   # Mamba-1.4B decode, batch 1, 64, 128: seqlab vs mamba-ssm's graphs
#   bash benchmarks/official_gpu.sh hf         # seqlab bench generate --hf: transformers' Mamba, official kernels
# Files under $OUT (default ./gpu-results): env.txt, build.log, <part>.log, <part>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
PY="${PYTHON:-python3}"
part="${1:-scan}"
WAIT="${WAIT:-540}"  # seconds a part waits for a build still running
# BUILD_ARGS=--scan-only: build the selective scan's extension alone (enough for the scan part)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.official/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
site=.official/site
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  nvcc --version 2>/dev/null | tail -2
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null
} >"$OUT/env.txt" 2>&1

built() { [ -f "$site/.ready" ]; }
if ! built && [ ! -f .official/.building ]; then
  touch .official/.building
  setsid bash -c "'$PY' benchmarks/official_build.py ${BUILD_ARGS:-} >.official/build.log 2>&1 && touch $site/.ready
                  rm -f .official/.building" &
fi
t0=$SECONDS
while ! built && [ -f .official/.building ] && [ $((SECONDS - t0)) -lt "$WAIT" ]; do sleep 5; done
[ -f .official/build.log ] && { grep -E "^built|error|Error|ready" .official/build.log | tail -20; cp .official/build.log "$OUT/"; }
if ! built; then
  [ -f .official/.building ] && echo "build still running after $((SECONDS - t0)) s" || echo "build failed"
  exit 1
fi
case "$part" in
  build) echo "built" ;;
  scan) timeout 560 "$PY" benchmarks/official_mamba.py --sections scan --json "$OUT/scan.json" 2>&1 | tee "$OUT/scan.log" ;;
  generate)
    timeout 560 "$PY" benchmarks/official_mamba.py --sections generate --json "$OUT/generate.json" 2>&1 \
      | tee "$OUT/generate.log" ;;
  hf)
    timeout 560 "$PY" -m seqlab bench generate --models mamba:1.4b --batch 1,64 --prompt-len 2048 --gen-len 128 \
      --dtype bf16 --state-dtype bf16 --hf --json "$OUT/hf.json" 2>&1 | tee "$OUT/hf.log" ;;
  *) echo "official_gpu.sh: part must be build, scan, generate or hf, got '$part'" >&2; exit 2 ;;
esac
