#!/usr/bin/env bash
# A whole model on the GPU, end to end: tune-model --target cuda, export (cubins), then
# run --lib --compare (the tuned kernels beside the numpy reference on the host and the same
# model on untuned template defaults on the GPU). From the project root, on the GPU machine:
#
#   source .device/env.sh && bash benchmarks/gpu_model_check.sh
#
# Knobs: GPU_MODEL (benchmarks/models/llama-100m/config.json), GPU_MODEL_TRIALS (120),
# GPU_MODEL_QUANTIZE (none). Logs and the run's JSON go to $OUT/gpu_model-<time>/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_model-$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export AUTOTUNE_CACHE_DIR=${AUTOTUNE_CACHE_DIR:-/tmp/autotune-kernels}
MODEL=${GPU_MODEL:-benchmarks/models/llama-100m/config.json}
TRIALS=${GPU_MODEL_TRIALS:-120}
QUANTIZE=${GPU_MODEL_QUANTIZE:-none}

echo "tune-model $MODEL ($QUANTIZE) on cuda, $TRIALS trials"
timeout 240 $PY -m autotune.cli tune-model --model "$MODEL" --target cuda --quantize "$QUANTIZE" \
  --prefill-tokens 128 --decode-batch 1 --kv-len 512 --trials-total "$TRIALS" --log "$LOG/model.jsonl" \
  --no-mlflow --quiet > "$LOG/tune-model.txt" 2>&1
echo "tune-model exit code $?"; tail -n 25 "$LOG/tune-model.txt"
timeout 120 $PY -m autotune.cli export --log "$LOG/model.jsonl" --out "$LOG/lib" --target cuda > "$LOG/export.txt" 2>&1
echo "export exit code $?"; tail -n 3 "$LOG/export.txt"
timeout 180 $PY -m autotune.cli run --lib "$LOG/lib" --model "$MODEL" --prompt-tokens 100 --new-tokens 32 \
  --compare --json > "$LOG/run.json" 2> "$LOG/run.err"
echo "run exit code $?"; tail -n 5 "$LOG/run.err"
$PY - "$LOG/run.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"decode tok/s: tuned {r['decode_tokens_per_s']:.1f}, numpy {r['reference']['decode_tokens_per_s']:.1f}, "
      f"defaults {r['defaults']['decode_tokens_per_s']:.1f}; prefill tok/s tuned {r['prefill_tokens_per_s']:.0f}; "
      f"largest logit difference vs numpy {r['reference']['logits']['max_rel']:.1e} (relative)")
PYEOF
