#!/usr/bin/env bash
# Training runs on one CUDA GPU. Writes logs, results.json and report.html under $OUT (default ./gpu-results).
# One part per call, each under 10 minutes:
#
#   bash benchmarks/train_gpu.sh lm      # compare-lm: transformer, mamba, mamba2 at 130m on the stdlib corpus
#   bash benchmarks/train_gpu.sh fsdp    # FSDP2 on one GPU, mamba 370m, with and without activation checkpointing
#   bash benchmarks/train_gpu.sh arena   # seqlab arena --budget gpu (results.json, report.html, per-run metrics)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
part="${1:-lm}"
WORK="${WORK:-/tmp/seqlab-gpu}"
mkdir -p "$WORK"

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1

case "$part" in
  lm)
    timeout 560 "$PY" -m seqlab compare-lm --models transformer,mamba,mamba2 --sizes 130m --tokens 12m \
      --seqlen 1024 --batch-size 16 --lr 1.5e-3 --eval-tokens 262144 --out "$WORK/lm" 2>&1 | tee "$OUT/lm.log"
    cp "$WORK/lm/results.json" "$WORK/lm/report.html" "$OUT/" 2>/dev/null
    ;;
  fsdp)
    for variant in "--checkpoint-activations --batch-size 8" "--batch-size 8" "--checkpoint-activations --batch-size 32"; do
      echo "+ torchrun --nproc-per-node 1 -m seqlab train --data stdlib --model mamba --size 370m --parallel fsdp" \
        "$variant --seqlen 2048 --steps 40" | tee -a "$OUT/fsdp.log"
      # shellcheck disable=SC2086
      timeout 170 torchrun --nproc-per-node 1 -m seqlab train --data stdlib --model mamba --size 370m \
        --parallel fsdp $variant --seqlen 2048 --steps 40 --lr 3e-4 --quiet --out "$WORK/fsdp-${variant// /}" \
        2>&1 | tail -6 | tee -a "$OUT/fsdp.log"
    done
    ;;
  arena)
    timeout 560 "$PY" -m seqlab arena --budget gpu --out "$WORK/arena" 2>&1 | tee "$OUT/arena.log"
    cp "$WORK/arena/results.json" "$WORK/arena/report.html" "$OUT/" 2>/dev/null
    tar czf "$OUT/metrics.tgz" -C "$WORK/arena" metrics 2>/dev/null
    # the report's numbers must not depend on one test set: re-score two checkpoints on a fresh seed
    for task in mqar selective_copy; do
      timeout 20 "$PY" -m seqlab eval --checkpoint "$WORK/arena/checkpoints/$task/mamba2" --seed 7 --samples 512 \
        --json 2>&1 | tail -1 >>"$OUT/eval-seed7.txt"
    done
    ;;
  *)
    echo "usage: bash benchmarks/train_gpu.sh lm|fsdp|arena" >&2
    exit 2
    ;;
esac
