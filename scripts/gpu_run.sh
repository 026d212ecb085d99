#!/usr/bin/env bash
# The one command the lent GPU machine runs, from the repository root, with .whl/ carried
# (scripts/gpu_bundle.sh fills it on a machine with PyPI):
#
#   bash scripts/gpu_run.sh            # all phases: env, tests (pytest -m gpu tests/gpu), benchmark
#   bash scripts/gpu_run.sh tests      # only the GPU tests
#   bash scripts/gpu_run.sh bench      # only benchmark/step_latency.py (Qwen3-8B dummy bf16)
#   bash scripts/gpu_run.sh duet       # Duet: tests/gpu/test_gpu_duet.py (facts in duet_facts.json),
#                                      # then calibration (sglang_duet.calibrate, Qwen3-8B dummy)
#   bash scripts/gpu_run.sh calibrate  # only the calibration (DUET_CALIBRATE_ARGS=--quick for a short one)
#
# Logs and results go under $OUT (the device tool brings that folder back; at most 8 files,
# two folders deep). One device command may run 10 minutes, so every phase has its own
# timeout and the whole run stays under about 9.5 minutes; FlashInfer's JIT cache lives in
# $FLASHINFER_WORKSPACE_BASE (/tmp), so a second call on the same warm machine skips compiles.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-all}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-560}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_run $(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_run.log"; }

# ---- environment ----------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/gpu_run.log" 2>&1 || { log "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  log "no .whl/ folder: FlashInfer and the server packages will be missing (run scripts/gpu_bundle.sh and carry .whl)"
fi
# The repository is not pip-installed here; the package maps kernels/ and policies/ under
# sglang_duet (pyproject's package-dir). Links in this throwaway copy of the tree do the same.
[ -e sglang_duet/kernels ] || ln -s ../kernels sglang_duet/kernels
[ -e sglang_duet/policies ] || ln -s ../policies sglang_duet/policies
export PYTHONPATH=$PWD:${PYTHONPATH}
export CUDA_HOME=/usr/local/cuda  # deriving it from the nvcc wrapper's path goes wrong (gpu.md)
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer_ws}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
mkdir -p "$FLASHINFER_WORKSPACE_BASE"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "sms", torch.cuda.get_device_properties(0).multi_processor_count)
for name in ("triton", "flashinfer", "tvm_ffi", "zmq", "fastapi", "msgspec", "orjson", "uvicorn", "gguf"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
EOF
} >"$OUT/env.txt" 2>&1
log "environment: $(tr '\n' ';' <"$OUT/env.txt" | cut -c1-400)"

rc=0
# ---- GPU tests ---------------------------------------------------------------------------------
if [ "$PHASE" = all ] || [ "$PHASE" = tests ]; then
  T=$(( $(left) - ( [ "$PHASE" = all ] && echo 170 || echo 0 ) ))
  log "pytest -m gpu tests/gpu (timeout ${T}s)"
  timeout "$T" python3 -m pytest -m gpu tests/gpu -v -rs --durations=15 -p no:cacheprovider \
    -o addopts="" --timeout=300 >"$OUT/pytest_gpu.log" 2>&1
  r=$?
  tail -n 5 "$OUT/pytest_gpu.log" | tee -a "$OUT/gpu_run.log"
  log "pytest exit code $r"
  [ $r -ne 0 ] && rc=$r
fi

# ---- step-latency benchmark -----------------------------------------------------------------
if [ "$PHASE" = all ] || [ "$PHASE" = bench ]; then
  T=$(( $(left) - 10 ))
  if [ "$T" -lt 60 ]; then
    log "benchmark skipped: ${T}s left (run: bash scripts/gpu_run.sh bench)"
  else
    log "benchmark/step_latency.py (timeout ${T}s)"
    timeout "$T" python3 benchmark/step_latency.py --out "$OUT/step_latency" >"$OUT/step_latency.log" 2>&1
    r=$?
    log "step_latency exit code $r"
    [ $r -ne 0 ] && rc=$r
  fi
fi
# ---- Duet: SM partitions, two-lane executor, calibration ----------------------------------------
if [ "$PHASE" = duet ]; then
  export DUET_GPU_FACTS="$OUT/duet_facts.json"
  T=$(( $(left) - 240 ))  # leave the calibration about 4 minutes
  log "pytest tests/gpu/test_gpu_duet.py (timeout ${T}s)"
  timeout "$T" python3 -m pytest -m gpu tests/gpu/test_gpu_duet.py -v -rs --durations=15 -p no:cacheprovider \
    -o addopts="" --timeout=240 >"$OUT/pytest_duet.log" 2>&1
  r=$?
  tail -n 5 "$OUT/pytest_duet.log" | tee -a "$OUT/gpu_run.log"
  log "pytest (duet) exit code $r"
  [ $r -ne 0 ] && rc=$r
fi
if [ "$PHASE" = duet ] || [ "$PHASE" = calibrate ]; then
  HW=$(python3 -c 'import torch; print("h200" if "H200" in torch.cuda.get_device_name(0) else "h100")')
  T=$(( $(left) - 10 ))
  mkdir -p "$OUT/calibration"
  log "calibration on $HW (timeout ${T}s) ${DUET_CALIBRATE_ARGS:-}"
  # shellcheck disable=SC2086
  timeout "$T" python3 -m sglang_duet.calibrate --model-config configs/models/qwen3-8b.json --hardware "$HW" \
    --out "$OUT/calibration/$HW-calibrated.yaml" ${DUET_CALIBRATE_ARGS:-} >"$OUT/calibrate.log" 2>&1
  r=$?
  log "calibration exit code $r"
  [ $r -ne 0 ] && rc=$r
fi
log "done, exit $rc"
exit $rc
