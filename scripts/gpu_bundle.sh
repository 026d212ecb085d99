#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels the lent GPU machine lacks (it has no
# network): cp312 manylinux x86_64 builds into the git-ignored .whl/ folder at the repo root.
# scripts/gpu_run.sh installs them there with `pip install --no-index --target /tmp/site`.
#
# The GPU image already has torch 2.11 (cu130), triton 3.6, numpy, transformers, tokenizers,
# safetensors, jinja2, pyyaml, tqdm, aiohttp (+ its deps), anyio, click, h11, httpx,
# prometheus-client, typing-extensions, annotated-doc, uvloop, pytest: those are NOT carried.
# numba is not carried: the image has numba and llvmlite (device KINDS.md), and no warning that duet's
# compiled search was unavailable appeared in the 2026-11-30 A/B logs (policies/search_kernels.py).
# Versions are pinned so the bundle is reproducible; each is the version the CPU dev
# machines run, and --no-deps means every needed dependency is listed here explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHL_DIR:-.whl}
mkdir -p "$DEST"

PKGS=(
  pyzmq==27.3.0
  msgspec==0.22.0
  orjson==3.13.0
  fastapi==0.165.0
  starlette==1.10.0
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  sniffio==1.3.1
  opentelemetry-api==1.45.2   # fastapi 0.165 imports it at import time
  uvicorn==0.54.0
  gguf==0.19.0
  # FlashInfer: pure Python + CUDA sources, JIT-compiled with nvcc on first use (gpu.md).
  # 0.7+ is over 60 MB; 0.6.18.post1 needs tvm-ffi 0.1.15.post2 and nothing else for
  # Hopper FA2/FA3 attention and sampling.
  flashinfer-python==0.6.18.post1
  apache-tvm-ffi==0.1.15.post2
)

PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done

for spec in "${PKGS[@]}"; do
  name=${spec%%==*}
  # Skip what is already there (any version of it: two versions break the install).
  norm=$(echo "$name" | tr '-' '_' | tr '[:upper:]' '[:lower:]')
  if ls "$DEST" 2>/dev/null | tr '[:upper:]' '[:lower:]' | grep -q "^${norm}-"; then
    continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d "$DEST" "$spec"
done

du -ch "$DEST"/*.whl | tail -1
ls "$DEST"
