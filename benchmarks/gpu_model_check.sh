#!/usr/bin/env bash
# Whole models on the GPU, every line of the model-level targets in one go (about 5 minutes on
# the H200). From the project root, on the GPU machine:
#
#   source .device/env.sh && bash benchmarks/gpu_model_check.sh
#
# (`.device/env.sh`: made by the staging script on the project's lent GPU machine; elsewhere,
# install the project with its cuda and dev extras, nvcc and a CUDA torch: docs/design.md.)
#
# 1. llama-100m in float16 through the user's path: tune-model --dtype float16, export (cubins),
#    autotune run --lib --compare (the numpy reference and the template defaults beside it);
# 2. llama-2-7b and llama-3-8b, float16 and int4 (q4, float16 activations): tune-model on a small
#    budget, then benchmarks/gpu_model.py: weights generated on the device, batch 1, prompt 128,
#    128 new tokens; decode/prefill tokens/s against the bandwidth floor and plain torch eager,
#    logits against torch in float32.
# Logs go to /tmp/gpu_model-<time>/ and, when OUT is set, as one tar to $OUT/gpu_model-logs.tar.gz
# (written again after each case); the summary table is printed last.
#
# Both GPU issues in one 15-minute device session: this script with GPU_MODEL_SMALL=0 (about 6
# minutes typically, at most about 8.5 by its own limits), then `GPU_CHECK_MODE=targets bash
# benchmarks/gpu_check.sh` (about 4-5 minutes, at most about 7.5). The typical runs fit with
# the two machine starts; the worst cases (about 16 minutes) do not: run this one first, and
# the second only with the time `status` says is left.
# Knobs: GPU_MODEL_TRIALS (48 per large model), GPU_MODEL_CASES ("llama-2-7b:none llama-2-7b:q4
# llama-3-8b:none llama-3-8b:q4"; any preset, qwen3-8b and gemma-3-1b too; MODEL:awq runs it as an AWQ
# checkpoint: int4 layers with zero points, group 128, the LM head in floats; MODEL:gptq-act as a GPTQ
# act-order one: symmetric int4 layers whose inputs are gathered first), GPU_MODEL_DTYPE (float16), GPU_MODEL_SMALL (1: run step 1),
# GPU_MODEL_BUDGET_S (360: no large case starts later; the last then ends by about 520 s), GPU_MODEL_RUN_ARGS (extra gpu_model.py options),
# GPU_MODEL_SEED_DIR (benchmarks/data/h200_models: NAME.jsonl.gz records of earlier runs, resumed;
# another dtype's run starts from the float16 records as priors),
# GPU_MODEL_TUNE_S (50: seconds of tuning per large model).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=/tmp/gpu_model-$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
export AUTOTUNE_CACHE_DIR=${AUTOTUNE_CACHE_DIR:-/tmp/autotune-kernels}
TRIALS=${GPU_MODEL_TRIALS:-48}
TUNE_S=${GPU_MODEL_TUNE_S:-50}  # each large model's tuning stops after this (its records stay)
SEED_DIR=${GPU_MODEL_SEED_DIR:-benchmarks/data/h200_models}  # earlier runs' records, resumed
DTYPE=${GPU_MODEL_DTYPE:-float16}
read -r -a CASES <<< "${GPU_MODEL_CASES:-llama-2-7b:none llama-2-7b:q4 llama-3-8b:none llama-3-8b:q4}"
START=$(date +%s)
step() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG/steps.log"; }
finish() {
  step "summary"
  {
    for f in "$LOG"/model-*.json; do [[ -s "$f" ]] && tail -n 1 "$f"; done
  } > "$LOG/summary.jsonl"
  $PY - "$LOG/summary.jsonl" <<'PYEOF' | tee "$LOG/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'model':<12}{'dtype':<9}{'quant':<6}{'steps':<9}{'decode tok/s':>13}{'floor':>10}{'of floor':>9}{'torch':>8}"
      f"{'vs torch':>9}{'prefill tok/s':>14}{'vs torch':>9}{'logit rel':>10}")
for r in rows:
    lg = r["logits_vs_torch_float32"]
    print(f"{r['model']:<12}{r['dtype']:<9}{r['quantize']:<6}{r['decode_mode']:<9}{r['decode_tokens_per_s']:>13.1f}"
          f"{r['floor_tokens_per_s']:>10.1f}{r['share_of_floor'] * 100:>8.0f}%{r['torch_decode_tokens_per_s']:>8.1f}"
          f"{r['decode_vs_torch']:>8.2f}x{r['prefill_tokens_per_s']:>14.0f}{r['prefill_vs_torch']:>8.2f}x"
          f"{lg['max_rel']:>10.1e}")
for r in rows:  # the captured step's programmatic edges (each kernel starting as the one before ends)
    if "programmatic_edges" in r:
        refused = f" (refused: {r['programmatic_error']})" if r.get("programmatic_error") else ""
        print(f"{r['model']} {r['quantize']}: {r.get('step_kernels', '?')} kernels, {r['programmatic_edges']} programmatic edges{refused}; decode "
              f"{r['decode_tokens_per_s']:.1f} tok/s with them, {r['decode_tokens_per_s_plain_graph']:.1f} without "
              f"({r['decode_tokens_per_s'] / r['decode_tokens_per_s_plain_graph']:.3f}x)")
for r in rows:  # where a decode step goes (torch's profiler over a timed run)
    prof = r.get("decode_profile") or {}
    if "kernels" in prof:
        top = ", ".join(f"{name} {k['share_of_step'] * 100:.0f}%" for name, k in list(prof["kernels"].items())[:6])
        print(f"{r['model']} {r['quantize']}: step {prof['wall_us_per_step']:.0f} us, "
              f"{prof.get('launches_per_step', 0):.0f} kernels, {prof['in_kernels_share'] * 100:.0f}% in kernels: {top}")
    elif prof:
        print(f"{r['model']} {r['quantize']}: no profile ({prof.get('error')})")
PYEOF
  [[ -n "${OUT:-}" ]] && tar -czf "$OUT/gpu_model-logs.tar.gz" -C "$(dirname "$LOG")" "$(basename "$LOG")"
}
trap finish EXIT
# the logs so far into $OUT after each case: a run killed at the device's time limit still returns them
save() { [[ -n "${OUT:-}" ]] && tar -czf "$OUT/gpu_model-logs.tar.gz" -C "$(dirname "$LOG")" "$(basename "$LOG")"; true; }

# seed_log MODEL QUANTIZE LOG: LOG starts from an earlier run's records of MODEL in $DTYPE, and
# prints how many (they count toward --trials-total). Without any, the float16 records start it:
# other tasks (another dtype), so they are not resumed, only the priors each new task starts from.
seed_log() {
  local own="$SEED_DIR/$1-$DTYPE-$2.jsonl.gz" half="$SEED_DIR/$1-float16-$2.jsonl.gz"
  if [[ -f "$own" ]]; then gunzip -c "$own" > "$3"; wc -l < "$3"
  else { [[ -f "$half" ]] && gunzip -c "$half" > "$3"; }; echo 0
  fi
}

step "device -> $LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
  > "$LOG/environment.txt" 2>&1
cat "$LOG/environment.txt"

if [[ "${GPU_MODEL_SMALL:-1}" != 0 ]]; then
  SMALL=benchmarks/models/llama-100m/config.json
  step "llama-100m $DTYPE: tune-model, export, run --compare"
  total=$(( $(seed_log llama-100m none "$LOG/small.jsonl") + 40 ))
  timeout 60 $PY -m autotune.cli tune-model --model "$SMALL" --target cuda --dtype "$DTYPE" --prefill-tokens 128 \
    --decode-batch 1 --kv-len 256 --trials-total "$total" --log "$LOG/small.jsonl" --no-mlflow --quiet \
    > "$LOG/small-tune.txt" 2>&1
  echo "tune-model exit code $?"; tail -n 4 "$LOG/small-tune.txt"
  timeout 45 $PY -m autotune.cli export --log "$LOG/small.jsonl" --out "$LOG/small-lib" --target cuda \
    > "$LOG/small-export.txt" 2>&1
  echo "export exit code $?"; tail -n 2 "$LOG/small-export.txt"
  timeout 60 $PY -m autotune.cli run --lib "$LOG/small-lib" --model "$SMALL" --prompt-tokens 100 --new-tokens 64 \
    --compare > "$LOG/small-run.txt" 2>&1
  echo "run exit code $?"; cat "$LOG/small-run.txt" | tail -n 8
  save
fi

BUDGET=${GPU_MODEL_BUDGET_S:-360}  # no case starts after this many seconds of the script
for case in "${CASES[@]}"; do
  model=${case%%:*}; quantize=${case##*:}
  if (( $(date +%s) - START > BUDGET )); then step "$case: skipped, out of time"; continue; fi
  name="$model-$DTYPE-$quantize"
  config=$model
  if [[ "$quantize" == awq ]]; then  # the model as an AWQ checkpoint: int4 layers with zero points, a float LM head
    config="$LOG/$model-awq"; quantize=q4
    mkdir -p "$config" && $PY -c "import dataclasses, sys; from runtime.model_config import load_model_config as load
c = load(sys.argv[1]); dataclasses.replace(c, name=c.name + '-awq', int4_format='awq', int4_group_size=128,
int4_zero_points=True).save(sys.argv[2] + '/config.json')" "$model" "$config"
  elif [[ "$quantize" == gptq-act ]]; then  # a GPTQ act-order checkpoint: gathered inputs, a float LM head
    config="$LOG/$model-gptq-act"; quantize=q4
    mkdir -p "$config" && $PY -c "import dataclasses, sys; from runtime.model_config import load_model_config as load
c = load(sys.argv[1]); dataclasses.replace(c, name=c.name + '-gptq-act', int4_format='gptq', int4_group_size=128,
int4_act_order=True).save(sys.argv[2] + '/config.json')" "$model" "$config"
  fi
  # resume from the records of an earlier run, if any: the new trials add to them
  seed=${case##*:}; [[ "$seed" == gptq-act ]] && seed=q4  # its int4 layers are q4's: their records carry over
  total=$(( $(seed_log "$model" "$seed" "$LOG/$name.jsonl") + TRIALS ))
  # (the seed file's lines count in full; tune-model resumes only those of this model's tasks)
  step "$name: tune-model (--trials-total $total: $TRIALS plus the $(( total - TRIALS )) records of $SEED_DIR)"
  timeout "$TUNE_S" $PY -m autotune.cli tune-model --model "$config" --target cuda --dtype "$DTYPE" --quantize "$quantize" \
    --prefill-tokens 128 --decode-batch 1 --kv-len 256 --trials-total "$total" --log "$LOG/$name.jsonl" \
    --no-mlflow --quiet > "$LOG/tune-$name.txt" 2>&1
  echo "tune-model exit code $?"; tail -n 3 "$LOG/tune-$name.txt"
  step "$name: run against the floor and torch"
  timeout 100 $PY benchmarks/gpu_model.py --model "$config" --dtype "$DTYPE" --quantize "$quantize" ${GPU_MODEL_RUN_ARGS:-} \
    --log "$LOG/$name.jsonl" > "$LOG/model-$name.json" 2> "$LOG/model-$name.err"
  echo "gpu_model exit code $?"; tail -n 2 "$LOG/model-$name.err"
  save
done
