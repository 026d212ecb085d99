"""load_model: one entry point for HF safetensors (single / sharded), GGUF and dummy weights.

dtype policy ('auto'): on a GPU, the checkpoint's dtype (config.json `dtype`/`torch_dtype`);
on a CPU, bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX, as vLLM's CPU build
does), else float32 (without those instructions bf16 matmuls are emulated and slower than float32).
$SGLANG_DUET_CPU_DTYPE (float32 | bfloat16) overrides the CPU's 'auto' (the test suite pins float32,
its parity oracle); an explicit --dtype always wins.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from sglang_duet.model_loader.decode_tokenizer import DecodeTokenizer, load_snapshot
from sglang_duet.models.config import ModelConfig
from sglang_duet.models.llama import LlamaForCausalLM
from sglang_duet.startup_phases import Phases

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any | None  # transformers tokenizer, DecodeTokenizer (tokenizer_decode_only), or None
    model_dir: str | None
    chat_template: str | None
    dtype: torch.dtype
    device: torch.device
    load_format: str  # the resolved format: safetensors | gguf | dummy
    mapped_file: str | None = None  # the serving-layout file the weights are views of (prepared.py)
    phases: Phases | None = None  # what the load spent its time on, in order


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return cpu_auto_dtype()
        # like vLLM/SGLang: a float32 checkpoint is served in bf16 on a GPU (FlashInfer has no fp32 kernels)
        return torch.bfloat16 if checkpoint_dtype == "float32" else _DTYPES[checkpoint_dtype]
    if dtype not in _DTYPES:
        raise ValueError(f"Invalid --dtype {dtype!r}: expected one of auto, bfloat16, float16, float32")
    return _DTYPES[dtype]


CPU_DTYPE_ENV = "SGLANG_DUET_CPU_DTYPE"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(capability: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """Whether torch's CPU kernels run bf16 natively here: an AVX512 build of the kernels (torch's
    capability) on a CPU with AVX512-BF16 or AMX-BF16. Without them (e.g. AVX2 only) bf16 is
    converted to float32 around every op, slower than float32 itself."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    flags = cpu_flags() if flags is None else flags
    return capability.startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_auto_dtype() -> torch.dtype:
    """'auto' on a CPU: $SGLANG_DUET_CPU_DTYPE if set, else bf16 where native, else float32."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in _DTYPES:
            raise ValueError(f"Invalid ${CPU_DTYPE_ENV} {forced!r}: expected auto, bfloat16 or float32")
        return _DTYPES[forced]
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _resolve_format(model_path: str, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"Invalid --load-format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    if load_format != "auto":
        return load_format
    if os.path.isfile(model_path):
        if model_path.endswith(".gguf"):
            return "gguf"
        if model_path.endswith(".safetensors"):
            return "safetensors"
        raise ValueError(f"Cannot tell the format of {model_path}; pass --load-format")
    if glob.glob(os.path.join(model_path, "*.safetensors")):
        return "safetensors"
    if glob.glob(os.path.join(model_path, "*.gguf")):
        return "gguf"
    raise ValueError(f"No *.safetensors or *.gguf weights in {model_path} (.bin checkpoints are not supported)")


def safetensors_files(model_dir: str) -> list[str]:
    """Shards listed by model.safetensors.index.json, else every *.safetensors in the folder."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, s) for s in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {model_dir}")
    return files


def iter_safetensors(files: list[str], shard=None):
    """(name, tensor) of every tensor in `files`; with `shard` (name -> ShardSpec | None, a
    tensor-parallel rank's `model.weight_shard`) only that rank's slice is read from disk."""
    from safetensors import safe_open

    from sglang_duet.distributed.sharding import read_shard

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, read_shard(f, name, shard(name) if shard else None)


def load_tokenizer(model_dir: str | None, decode_only: bool = False):
    """The folder's tokenizer, or None when it has no tokenizer files. decode_only=True (the server's
    scheduler, which only decodes): a DecodeTokenizer where the folder has a decode snapshot
    (decode_tokenizer.py), loaded without importing transformers; else the transformers tokenizer."""
    if model_dir is None or not os.path.isdir(model_dir):
        return None
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        return None
    if decode_only:
        snapshot = _decode_snapshot(model_dir)
        if snapshot is not None:
            return snapshot
    from sglang_duet.model_loader.tokenizer_cache import remember_tokenizer_class, remembered_tokenizer_class

    cls = remembered_tokenizer_class(model_dir)
    if cls is not None:
        return cls.from_pretrained(model_dir, local_files_only=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    remember_tokenizer_class(model_dir, tok)
    return tok


def _decode_snapshot(model_dir: str):
    """The embedded folder's decode snapshot (its tokenizer copy, marked), or None."""
    from sglang_duet.model_loader.embedded import is_embedded_folder

    if not is_embedded_folder(model_dir):
        return None  # the snapshot lives in the embedded folder's serving/ dir, ours to write in
    from sglang_duet.model_loader.tokenizer_cache import tokenizer_copy_dir

    # structured output's transformers tokenizer, on its first grammar: this folder's, as without a snapshot
    return load_snapshot(tokenizer_copy_dir(model_dir), load_transformers=lambda: load_tokenizer(model_dir))


def _chat_template(tokenizer, model_dir: str | None) -> str | None:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if model_dir and os.path.isfile(os.path.join(model_dir, "chat_template.jinja")):
        with open(os.path.join(model_dir, "chat_template.jinja")) as f:
            return f.read()
    return None


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp=None) -> LlamaForCausalLM:
    # Build on the meta device, then allocate uninitialised storage on the target device:
    # no host-side init of multi-GB weights that are overwritten right away.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, dtype, **({"tp": tp} if tp is not None else {}))
    model = model.to(dtype).to_empty(device=device)
    return model.eval()


def _prepare_for_inference(model: LlamaForCausalLM, device: torch.device, pack: bool = True) -> None:
    """One GEMM for q/k/v and one for gate/up per layer: on a CPU bit-identical to the separate ones and
    fewer passes over the activations; on a GPU three launches fewer per layer (a decode step of a
    36-layer model is launch-bound: docs/gpu-notes.md, H200 lease of 2026-11-30). pack=False: a copy
    made only to write the serving file, which holds no blocked weights."""
    model.fuse_projections()
    if model.wants_gemv_weights(device):  # one-row steps at the CPU's streaming speed (models/cpu_weights.py)
        model.add_gemv_weights()
    if pack:
        _add_packed_weights(model, device)


def _add_packed_weights(model: LlamaForCausalLM, device: torch.device) -> None:
    """Small float32 and bf16 models on a CPU multiply with oneDNN's blocked weights (models/cpu_weights.py),
    bf16 only where the CPU runs it natively (elsewhere it was never measured, and oneDNN may not take it);
    SGLANG_DUET_CPU_PACKED=0 keeps the plain GEMM (an A/B, or to save the memory)."""
    if os.environ.get("SGLANG_DUET_CPU_PACKED", "1") == "0" or not model.wants_packed_weights(device):
        return
    if model.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return
    model.add_packed_weights()


def load_model(model_path: str | None, load_format: str = "auto", dtype: str = "auto",
               device: str | torch.device = "cpu", model_config_path: str | None = None,
               seed: int = 0, tp=None, tokenizer: bool = True, tokenizer_decode_only: bool = False) -> LoadedModel:
    """Load a model for serving.

    model_path: HF folder, *.gguf file (or a folder holding one), or None for the embedded
    default model (SmolLM2-135M-Instruct). With load_format='dummy', weights are random
    (deterministic from `seed`) and the config comes from `model_config_path` (a folder or
    a JSON file) or from model_path. `tp` (a TPGroup): build and load only this rank's shard.
    tokenizer=False skips the tokenizer (a follower rank never needs one; transformers' import is slow).
    tokenizer_decode_only=True: a tokenizer that need only decode (the server's scheduler), see load_tokenizer.
    """
    device = torch.device(device)
    phases = Phases()
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"Invalid --load-format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    from sglang_duet.model_loader.embedded import default_model_path, is_embedded_folder

    if model_path is None and not (load_format == "dummy" and model_config_path):
        model_path = default_model_path()
        phases.mark("embedded model path")
    embedded = is_embedded_folder(model_path)
    if model_path is not None and not os.path.exists(model_path):
        from sglang_duet.model_loader.serving_config import missing_model_message

        raise FileNotFoundError(missing_model_message("model path", model_path))

    if load_format == "dummy":
        cfg = ModelConfig.from_path(model_config_path or model_path)
        model_dir = model_path if model_path and os.path.isdir(model_path) else None
        torch_dtype = resolve_dtype(dtype, cfg.dtype, device)
        model = _empty_model(cfg, torch_dtype, device, tp)
        model.init_dummy_weights(seed)
        _prepare_for_inference(model, device)
        phases.mark("weights (dummy)")
        tok = load_tokenizer(model_dir, tokenizer_decode_only) if tokenizer else None
        phases.mark("tokenizer")
        return LoadedModel(model, cfg, tok, model_dir, _chat_template(tok, model_dir), torch_dtype, device, "dummy",
                           phases=phases)

    fmt = _resolve_format(model_path, load_format)
    if fmt == "gguf":
        loaded = _load_gguf(model_path, dtype, device, tp, tokenizer)
        loaded.phases = phases
        phases.mark("weights and tokenizer (GGUF)")
        return loaded

    model_dir = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    cfg = ModelConfig.from_path(model_config_path or model_dir)
    torch_dtype = resolve_dtype(dtype, cfg.dtype, device)
    files = [model_path] if os.path.isfile(model_path) else safetensors_files(model_dir)
    mapped = None
    if embedded and device.type == "cpu" and (tp is None or tp.size == 1):
        model, mapped = _mapped_model(cfg, torch_dtype, device, files)
    else:
        model = _copied_model(cfg, torch_dtype, device, tp, files)
    phases.mark("weights (mapped)" if mapped else "weights")
    tok = load_tokenizer(model_dir, tokenizer_decode_only) if tokenizer else None
    snapshot = isinstance(tok, DecodeTokenizer)
    if tok is not None and embedded and not snapshot:
        from sglang_duet.model_loader.tokenizer_cache import keep_tokenizer_copy

        keep_tokenizer_copy(model_dir, tok)
    phases.mark("tokenizer (decode snapshot)" if snapshot else "tokenizer")
    logger.info("model loaded: %s", phases.summary())
    return LoadedModel(model, cfg, tok, model_dir, _chat_template(tok, model_dir), torch_dtype, device, "safetensors",
                       mapped_file=mapped, phases=phases)


def _copied_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp, files: list[str],
                  pack: bool = True) -> LlamaForCausalLM:
    """Parameters allocated on `device` and the checkpoint copied into them (this rank's slices)."""
    model = _empty_model(cfg, dtype, device, tp)
    model.load_weights(iter_safetensors(files, model.weight_shard))
    _prepare_for_inference(model, device, pack)
    return model


def _mapped_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  files: list[str]) -> tuple[LlamaForCausalLM, str | None]:
    """The model with its parameters mapped from the serving-layout file (prepared.py), built from the
    checkpoint on first use; on any failure there, a copied model (the mapping only saves time)."""
    from sglang_duet.model_loader.prepared import load_prepared

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, dtype).to(dtype)
    try:
        path = load_prepared(model, files, lambda: _copied_model(cfg, dtype, device, None, files, pack=False))
        _add_packed_weights(model, device)
        return model.eval(), path
    except Exception as e:  # noqa: BLE001 - e.g. a read-only cache: serve from a copy as before
        logger.warning("serving-layout weights unavailable (%s: %s); loading a private copy", type(e).__name__, e)
        return _copied_model(cfg, dtype, device, None, files), None


def _load_gguf(path: str, dtype: str, device: torch.device, tp=None, tokenizer: bool = True) -> LoadedModel:
    from sglang_duet.distributed.sharding import shard_tensor
    from sglang_duet.model_loader.gguf_loader import load_gguf_tokenizer, read_gguf

    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) != 1:
            raise ValueError(f"Expected exactly one *.gguf in {path}, found {len(found)}")
        path = found[0]
    contents = read_gguf(path)
    cfg = ModelConfig.from_dict(contents.config)
    cfg.name = cfg.name or os.path.basename(path).removesuffix(".gguf")
    torch_dtype = resolve_dtype(dtype, cfg.dtype, device)
    model = _empty_model(cfg, torch_dtype, device, tp)
    # Each GGUF tensor is dequantised whole when reached, sliced, copied into this rank's shard and
    # dropped: a rank holds one whole tensor at a time (safetensors reads only the slice).
    model.load_weights((n, shard_tensor(t, model.weight_shard(n))) for n, t in contents.iter_tensors())
    _prepare_for_inference(model, device)
    tok = load_gguf_tokenizer(path, contents.tokenizer_pre) if tokenizer else None
    template = getattr(tok, "chat_template", None) or contents.chat_template
    return LoadedModel(model, cfg, tok, os.path.dirname(os.path.abspath(path)), template, torch_dtype, device, "gguf")
