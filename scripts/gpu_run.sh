#!/usr/bin/env bash
# The command a lent GPU machine runs, from the repository root, with .whl/ carried
# (scripts/gpu_bundle.sh fills it on a machine with PyPI). A lease is 15 minutes of device time,
# 10 per command, so the work comes in two calls, each ordered by value: a run cut off at its
# time limit still leaves the most important facts under $OUT.
#
#   bash scripts/gpu_run.sh lease1   # smoke, prewarm (FlashInfer JIT), kernel/graph/engine tests, duet tests
#   bash scripts/gpu_run.sh lease2   # step-latency benchmark, calibration (+ lane contention), policy A/B
#   bash scripts/gpu_run.sh all      # both, in one call (when one call has the time)
#   bash scripts/gpu_run.sh lease3   # after a first lease: fused-op and engine tests, fused vs torch ops, calibration, 3-seed A/B
#   bash scripts/gpu_run.sh "PHASE ..."  # chosen phases, in this order: smoke prewarm fused tests duet bench
#                                        # bench_torch_ops bench_triton calibrate ab
#
#   GPU_RUN_DRY=1 bash scripts/gpu_run.sh all   # on any machine: every phase's shell logic runs, each
#                                               # python command only checks itself (--help /
#                                               # pytest --collect-only); tests/test_gpu_run_script.py
#
# Every phase has its own timeout, cut to the time the whole call has left (GPU_RUN_BUDGET_S,
# default 560 s); a phase that fails or times out is reported and the next one still runs; the
# script exits non-zero if any phase failed. Everything a phase writes goes to $WORK; after each
# phase $WORK is packed into $OUT/results-<call>.tgz (the device tool returns at most 8 files),
# and the compiled FlashInfer modules into $OUT/flashinfer_so.tgz[.partNN] (<= 15 MiB a file).
# Carry .gpu_cache/ (git-ignored; put a lease's flashinfer_so.tgz there) and those modules are placed
# where FlashInfer loads ahead-of-time builds from, so prewarm loads them instead of compiling (~28 s each).
# The A/B: GPU_RUN_AB_SEEDS traces (default 1) of GPU_RUN_AB_REQUESTS requests (64) at GPU_RUN_AB_RATE req/s
# (10) through GPU_RUN_AB_POLICIES (default "aggregated chunked static-split duet"; tuned variants as
# NAME:BUDGET+KEY=VALUE, e.g. chunked:2048 static-split+decode_sms=48).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:-all}
TAG=$(echo "$CALL" | tr -s ' ' '_')  # names the summary and the results archive ($OUT names: no spaces)
OUT=${OUT:-/tmp/gpu_out}
WORK=${GPU_RUN_WORK:-/tmp/gpu_work}
PY=${GPU_RUN_PYTHON:-python3}
DRY=${GPU_RUN_DRY:-0}
BUDGET=${GPU_RUN_BUDGET_S:-560}
AB_SEEDS=${GPU_RUN_AB_SEEDS:-1}
AB_REQUESTS=${GPU_RUN_AB_REQUESTS:-64}
AB_RATE=${GPU_RUN_AB_RATE:-10}
AB_POLICIES=${GPU_RUN_AB_POLICIES:-aggregated chunked static-split duet}
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
FAILED=0
SUMMARY="$WORK/summary-$TAG.txt"
: >"$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_run $(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/gpu_run.log"; }
pack() {  # small, so it runs after every phase: a killed call still returns what came before
  tar czf "$OUT/results-$TAG.tgz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results-$TAG.tgz.tmp" "$OUT/results-$TAG.tgz"
}

# run_phase NAME WANT_S MIN_S CMD...: runs CMD with timeout min(WANT_S, time left - 5), skips it
# when fewer than MIN_S seconds are left. Output to $WORK/NAME.log. Never exits the script.
run_phase() {
  local name=$1 want=$2 min=$3; shift 3
  local avail=$(( $(left) - 5 ))
  local t=$want
  if [ "$avail" -lt "$t" ]; then t=$avail; fi
  if [ "$t" -lt "$min" ]; then
    log "phase $name: SKIPPED (${avail}s left, needs ${min}s)"
    echo "$name skipped ${avail}s-left" >>"$SUMMARY"
    return 0
  fi
  local cmd=("$@")
  if [ "$DRY" = 1 ]; then  # check the command can start: its script/module exists and parses its flags
    if [ "${cmd[1]:-}" = "-m" ] && [ "${cmd[2]:-}" = "pytest" ]; then cmd+=(--collect-only -q); else cmd+=(--help); fi
  fi
  log "phase $name: start (timeout ${t}s): ${cmd[*]}"
  local t0=$(date +%s)
  timeout -k 10 "$t" "${cmd[@]}" >"$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 4 "$WORK/$name.log" | sed "s/^/    [$name] /" | tee -a "$WORK/gpu_run.log"
  if [ $rc -eq 0 ]; then
    log "phase $name: ok (${dt}s)"; echo "$name ok ${dt}s" >>"$SUMMARY"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "phase $name: TIMEOUT after ${dt}s"; echo "$name TIMEOUT ${dt}s" >>"$SUMMARY"; FAILED=1
  else
    log "phase $name: FAILED rc=$rc (${dt}s)"; echo "$name FAILED rc=$rc ${dt}s" >>"$SUMMARY"; FAILED=1
  fi
  pack
  return 0
}

# ---- environment --------------------------------------------------------------------------------
if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >>"$WORK/gpu_run.log" 2>&1; then
    log "wheel install FAILED (see gpu_run.log)"; FAILED=1
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no wheels installed (dry run, or no .whl/: FlashInfer and the server packages may be missing)"
fi
# FlashInfer's JIT loads <aot dir>/<name>/<name>.so without building when it exists (jit/core.py, is_aot).
if [ "$DRY" != 1 ] && [ -s .gpu_cache/flashinfer_so.tgz ]; then
  if AOT=$("$PY" -c 'from flashinfer.jit import env; print(env.FLASHINFER_AOT_DIR)' 2>>"$WORK/gpu_run.log") \
      && mkdir -p /tmp/fi_so && tar xzf .gpu_cache/flashinfer_so.tgz -C /tmp/fi_so; then
    for so in $(find /tmp/fi_so -name '*.so'); do
      name=$(basename "$so" .so); mkdir -p "$AOT/$name" && cp "$so" "$AOT/$name/"
    done
    log "placed $(find /tmp/fi_so -name '*.so' | wc -l) cached FlashInfer module(s) in $AOT"
  else
    log "cached FlashInfer modules NOT placed (see gpu_run.log): prewarm compiles"
  fi
fi
# The repository is not pip-installed there; the package maps kernels/ and policies/ under
# sglang_duet (pyproject's package-dir). Links in this throwaway copy do the same.
if [ "$DRY" != 1 ]; then
  [ -e sglang_duet/kernels ] || ln -s ../kernels sglang_duet/kernels
  [ -e sglang_duet/policies ] || ln -s ../policies sglang_duet/policies
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # deriving it from the nvcc wrapper's path goes wrong
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer_ws}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
if [ "$DRY" != 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
      --format=csv 2>&1
    "$PY" -c 'import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
for n in ("triton", "flashinfer", "tvm_ffi", "cuda.bindings", "zmq", "fastapi", "msgspec", "orjson", "uvicorn", "gguf",
          "transformers", "xdist"):
    try:
        m = importlib.import_module(n); print(n, getattr(m, "__version__", "?"))
    except Exception as e: print(n, "NOT IMPORTABLE:", type(e).__name__, e)' 2>&1
  } >"$WORK/env.txt"
  log "environment: $(tr '\n' ';' <"$WORK/env.txt" | cut -c1-600)"
fi

HW=${GPU_RUN_HW:-h100}  # the hardware file's name; on the device, read from the GPU unless set
if [ "$DRY" != 1 ] && [ -z "${GPU_RUN_HW:-}" ]; then
  HW=$("$PY" -c 'import torch; print("h200" if "H200" in torch.cuda.get_device_name(0) else "h100")' 2>/dev/null || echo h100)
fi
want() { case " $PHASES " in *" $1 "*) return 0;; *) return 1;; esac; }
ALL_PHASES="smoke prewarm fused tests duet bench bench_torch_ops bench_triton calibrate ab"
case "$CALL" in
  lease1) PHASES="smoke prewarm tests duet" ;;
  lease2) PHASES="prewarm bench calibrate ab" ;;  # prewarm: seconds when the cache is warm, else the compile
  lease3) PHASES="prewarm fused tests bench bench_torch_ops calibrate ab" ;;
  all) PHASES="$ALL_PHASES" ;;
  *) PHASES="$CALL"
     for ph in $PHASES; do
       case " $ALL_PHASES " in *" $ph "*) ;; *)
         echo "usage: $0 lease1|lease2|lease3|all|\"PHASE ...\" (phases: $ALL_PHASES)" >&2; exit 2 ;;
       esac
     done ;;
esac
log "call $CALL: phases [$PHASES], budget ${BUDGET}s, hardware $HW"

# ---- phases, by value ---------------------------------------------------------------------------
want smoke && run_phase smoke 90 20 "$PY" scripts/gpu_smoke.py --out "$WORK/smoke.json"
if want prewarm; then
  run_phase prewarm 240 30 "$PY" scripts/gpu_prewarm.py --out "$WORK/prewarm.json" --so-tar "$WORK/flashinfer_so.tgz"
  if [ -s "$WORK/flashinfer_so.tgz" ]; then  # outside $WORK's pack: it can be large
    mv "$WORK/flashinfer_so.tgz" /tmp/flashinfer_so.tgz
    rm -f "$OUT"/flashinfer_so.tgz*
    if [ "$(stat -c %s /tmp/flashinfer_so.tgz)" -le $(( 15 << 20 )) ]; then
      cp /tmp/flashinfer_so.tgz "$OUT/flashinfer_so.tgz"
    else
      split -b 15m -d -a 2 /tmp/flashinfer_so.tgz "$OUT/flashinfer_so.tgz.part"
      rm -f "$OUT/flashinfer_so.tgz.part05" "$OUT"/flashinfer_so.tgz.part0[6-9]  # keep within the 8-file limit
    fi
  fi
fi
PYTEST=("$PY" -m pytest -v -rs --durations=20 -p no:cacheprovider -o addopts= --timeout=240)
XDIST=()
if [ "$DRY" != 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then XDIST=(-n 4); fi
want fused && run_phase fused 90 30 "${PYTEST[@]}" -m gpu tests/gpu/test_gpu_fused_ops.py
want tests && run_phase tests 170 40 "${PYTEST[@]}" "${XDIST[@]}" -m gpu \
  tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_graphs.py tests/gpu/test_gpu_engine.py
export DUET_GPU_FACTS="$WORK/duet_facts.json"
want duet && run_phase duet 150 40 "${PYTEST[@]}" -m gpu \
  tests/gpu/test_gpu_duet.py
STEP_ARGS=(--hardware "$HW" --batches 1 32 128 --contexts 1024 4096 --prefills 1024 8192 --profile)
want bench && run_phase bench 100 40 "$PY" benchmark/step_latency.py "${STEP_ARGS[@]}" --out "$WORK/step_latency"
# The same steps on the Triton attention backend: at batch 1 FlashInfer's tensor-core decode (a prefill
# kernel and a merge, ~12.6 us a layer on the H200) may lose to a plain decode kernel.
want bench_triton && run_phase bench_triton 100 40 "$PY" benchmark/step_latency.py "${STEP_ARGS[@]}" \
  --attention-backend triton --out "$WORK/step_latency_triton"
# If the model failed on its fused kernels, the calibration and the A/B run on the torch ops (still measured).
if want bench && ! grep -q "^bench ok" "$SUMMARY"; then
  export SGLANG_DUET_TORCH_OPS=1
  log "bench failed: SGLANG_DUET_TORCH_OPS=1 from here on (the torch ops, not the fused kernels)"
fi
# The same steps with the model's plain torch ops instead of the fused kernels: the fusion's A/B.
want bench_torch_ops && run_phase bench_torch_ops 100 40 env SGLANG_DUET_TORCH_OPS=1 \
  "$PY" benchmark/step_latency.py "${STEP_ARGS[@]}" --out "$WORK/step_latency_torch_ops"
want calibrate && run_phase calibrate 140 60 "$PY" -m sglang_duet.calibrate \
  --model-config configs/models/qwen3-8b.json --hardware "$HW" --out "$WORK/calibration/$HW-calibrated.yaml" \
  --sizes 8 16 24 32 48 64 80 96 112 124 132 --validate-sizes 16 32 64 96 132 \
  --step-latency "$WORK/step_latency/results.json"  # the bench phase's whole-GPU rows join the fit
# The A/B's policies plan with the calibration just measured when there is one, else the committed one of a
# past lease, else the shipped curves.
CAL="$WORK/calibration/$HW-calibrated.yaml"
AB_HW=$HW
if [ -s "$CAL" ]; then AB_HW=$CAL
elif [ -s "configs/hardware/$HW-calibrated.yaml" ]; then AB_HW="configs/hardware/$HW-calibrated.yaml"  # a past lease's
fi
# One run took ~15 s on an H200 at 64 requests and 10 req/s (2026-11-30): the trace, its drain (~4 s) and
# a warm-up (~3 s); plus ~40 s to load the model and capture graphs.
read -r -a AB_POLICY_LIST <<<"$AB_POLICIES"
AB_WANT=$(( 40 + AB_SEEDS * ${#AB_POLICY_LIST[@]} * (AB_REQUESTS / ${AB_RATE%.*} + 9) ))
AB_T=$(( $(left) - 5 )); [ "$AB_T" -gt "$AB_WANT" ] && AB_T=$AB_WANT  # the phase's timeout (run_phase's rule)
want ab && run_phase ab "$AB_WANT" 60 "$PY" benchmark/gpu_ab.py --hardware "$AB_HW" --out "$WORK/ab" \
  --budget-s $(( AB_T - 20 )) --workload azure-conv --num-requests "$AB_REQUESTS" --rate "$AB_RATE" \
  --max-input 4096 --max-output 256 --tbt-slo-ms 100 --seeds "$AB_SEEDS" --policies "${AB_POLICY_LIST[@]}"

log "call $CALL done, failed=$FAILED"
cat "$SUMMARY"
pack
exit $FAILED
