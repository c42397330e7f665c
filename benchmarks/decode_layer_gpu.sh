#!/usr/bin/env bash
# Mamba's one-launch layer step on a GPU in one call: its tests natively (one process per test, 4 at a time), then
# benchmarks/decode_layer.py (checks, then the unfused step against the layer launch's tile configs) and the
# whole model's graphed decode step with and without it (benchmarks/decode_prefetch.py). Every part has its own
# time limit and writes under OUT as it goes.
#   bash benchmarks/decode_layer_gpu.sh OUT [BATCHES] [CONFIGS_JSON] [MODEL_BATCHES]
set -u
out=${1:?usage: decode_layer_gpu.sh OUT [BATCHES] [CONFIGS_JSON] [MODEL_BATCHES]}
batches=${2:-64,128,1}
configs=${3:-}
[ -n "$configs" ] || configs='[{}]'
model_batches=${4-64,128}  # given empty: no model run
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_mamba_layer.py 2>/dev/null | grep "::" \
  | xargs -P 4 -I{} sh -c 'timeout 240 python3 -m pytest -q -p no:cacheprovider "{}" > /dev/null 2>&1 \
      && echo "PASS {}" || echo "FAIL {}"' > "$out/pytest.log"
echo "$(grep -c '^PASS' "$out/pytest.log") passed, $(grep -c '^FAIL' "$out/pytest.log") failed" | tee -a "$out/pytest.log"
fi
timeout "${LAYER_LIMIT:-300}" python3 benchmarks/decode_layer.py --batch "$batches" --configs "$configs" --phases \
  --json "$out/decode_layer.json" 2>&1 | tee "$out/decode_layer.log"
if [ -n "$model_batches" ]; then
  timeout "${MODEL_LIMIT:-200}" python3 benchmarks/decode_prefetch.py --model mamba:1.4b --batch "$model_batches" \
    --state-dtype bf16 --variants off,off+layer --rounds 3 --json "$out/decode_model.json" 2>&1 \
    | tee "$out/decode_model.log"
fi
