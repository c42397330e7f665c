#!/usr/bin/env bash
# Inference benchmarks on one CUDA GPU: generation throughput vs batch (Mamba paper Fig. 8) and chunked prefill to
# 1M tokens. Writes logs and JSON under $OUT (default ./gpu-results). One part per call, each under 10 minutes:
#
#   bash benchmarks/generate_gpu.sh smoke      # ~1 min: GPU tests of the decode graph + every part at tiny sizes
#   bash benchmarks/generate_gpu.sh generate   # seqlab: transformer 1.3b, mamba 1.4b, mamba2 1.3b, batch 1..128
#   bash benchmarks/generate_gpu.sh hf         # the same three through transformers' implementations, same run
#   bash benchmarks/generate_gpu.sh long       # mamba2 130m to 1M tokens (passkey at 3 depths) + transformer 130m
#   bash benchmarks/generate_gpu.sh large      # transformer 1.3b and mamba 1.4b (bf16 state) at batch 64, 128, 256
#
# Files: env.txt, <part>.log, <part>.json (at most 8 files in all, as the device runner returns).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
part="${1:-smoke}"

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null \
    || echo "transformers: not installed (the hf part records 'unavailable')"
} >"$OUT/env.txt" 2>&1

bench() {  # bench <name> <limit seconds> <seqlab bench args...>
  local name="$1" limit="$2"
  shift 2
  echo "+ seqlab bench $*" | tee "$OUT/$name.log"
  timeout "$limit" "$PY" -m seqlab bench "$@" --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

case "$part" in
  smoke)
    "$PY" -m pytest -q -p no:cacheprovider tests/test_generation.py tests/test_bench_generate.py \
      tests/test_bench_long_context.py 2>&1 | tail -15 | tee "$OUT/smoke-tests.log"
    bench smoke-generate 200 generate --models transformer:small,mamba:small,mamba2:small --batch 1,2,...,8 \
      --prompt-len 256 --gen-len 32 --dtype bf16 --hf --bandwidth-bytes 1g
    bench smoke-long 120 long-context --model mamba2:small --context 64k --chunk 8k --passkey-depths 0.5 \
      --compare transformer:small --dtype bf16
    ;;
  generate)
    bench generate 570 generate --models transformer:1.3b,mamba:1.4b,mamba2:1.3b --batch 1,2,...,128 \
      --prompt-len 2048 --gen-len 128 --dtype bf16 --time-limit 60
    ;;
  hf)
    bench hf 570 generate --models transformer:1.3b,mamba:1.4b,mamba2:1.3b --batch 1,4,16,64 \
      --prompt-len 2048 --gen-len 128 --dtype bf16 --hf --repeats 1 --time-limit 40
    ;;
  large)
    bench large 570 generate --models mamba:1.4b,transformer:1.3b --batch 64,128,256 --prompt-len 2048 \
      --gen-len 128 --dtype bf16 --state-dtype bf16 --time-limit 120
    ;;
  long)
    bench long 570 long-context --model mamba2:130m --context 1m --chunk 8k --passkey-depths 0.1,0.5,0.9 \
      --compare transformer:130m --dtype bf16 --time-limit 150
    ;;
  *)
    echo "usage: bash benchmarks/generate_gpu.sh smoke|generate|hf|long|large" >&2
    exit 2
    ;;
esac
