"""Shared fixtures: tiny transformers-built checkpoints (see tests/tiny_models.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this at import: without a GPU its kernels run in the interpreter on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's oracle is transformers in float32: pin the CPU's --dtype auto there, also on CPUs where it
# would pick bf16 (tests of the bf16 path pass dtype explicitly).
os.environ.setdefault("SGLANG_DUET_CPU_DTYPE", "float32")
# A CPU model compiles its decode step by default (executor/gpu_executor.wants_torch_compile): every engine and
# server the suite starts would compile (~5-12 s each on 2 cores). The suite runs eagerly; the compiled step has
# its own tests (test_cpu_fast_path.py), which ask for it.
os.environ.setdefault("SGLANG_DUET_CPU_COMPILE", "0")

sys.path.insert(0, os.path.dirname(__file__))  # lets test modules `import tiny_models`

from tiny_models import FAMILIES, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """get(family, sharded=False) -> path of a tiny HF model folder, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, bool], str] = {}

    def get(family: str, sharded: bool = False) -> str:
        key = (family, sharded)
        if key not in built:
            built[key] = build_tiny_model(family, root / f"{family}{'-sharded' if sharded else ''}", sharded=sharded)
        return built[key]

    return get


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tiny_model_factory) -> str:
    """Parametrised over every tiny family."""
    return tiny_model_factory(request.param)
