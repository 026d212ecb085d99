"""What serving takes from the model folder and the flags beside the weights.

- `--tokenizer-path` / `--chat-template`: a tokenizer from another folder, a Jinja template file.
- `--context-length` beyond what the model was trained for is refused, as SGLang refuses it
  (unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1, SGLang's escape hatch).
- `generation_config.json`: the model's sampling defaults (temperature, top_p, top_k, min_p,
  repetition_penalty), used when a request sets none (SGLang's `--sampling-defaults model`).
- A Hugging Face hub id where a folder was expected gets an answer that says why it cannot work here.
"""
from __future__ import annotations

import json
import logging
import os
import re

logger = logging.getLogger(__name__)

GPU_PREFILL_BUDGET = 8192  # SGLang's default --chunked-prefill-size
# A CPU prefills a few hundred tokens a second (SmolLM2-135M, one core: ~5 ms a token), so a whole
# 8192-token budget is one step of tens of seconds during which no other stream advances and no
# abort or stat is handled. 512 tokens keep a step to a few seconds there.
CPU_PREFILL_BUDGET = 512
ALLOW_LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def missing_model_message(flag: str, path: str) -> str:
    """The error for a --model-path (or --tokenizer-path) that is not on this machine."""
    if _HUB_ID.match(path) and not path.startswith((".", "/")):
        return (f"{flag} {path}: not a local folder, and this looks like a Hugging Face hub id. This server has no "
                f"network access and downloads nothing: pass a local folder (e.g. one made by "
                f"`huggingface-cli download {path} --local-dir DIR` on a machine with network access)")
    return f"{flag} {path}: no such file or directory"


def read_chat_template(path: str) -> str:
    """--chat-template: a Jinja file (or a JSON file holding {"chat_template": ...}, as HF writes)."""
    if not os.path.isfile(path):
        raise ValueError(f"--chat-template {path}: no such file (built-in template names are not supported; "
                         f"pass a .jinja file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--chat-template {path}: a JSON template file must hold a \"chat_template\" "
                             f"string") from e
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--chat-template {path}: the template is empty")
    return text


def check_context_length(requested: int | None, model_max: int) -> int:
    """The context length to serve: the model's, or a requested one that does not exceed it."""
    if requested is None:
        return model_max
    if requested > model_max and os.environ.get(ALLOW_LONGER_CONTEXT_ENV, "").lower() not in ("1", "true"):
        raise ValueError(
            f"--context-length {requested} is greater than the model's context length ({model_max}, its "
            f"max_position_embeddings). This may lead to incorrect outputs. To allow it anyway, set "
            f"{ALLOW_LONGER_CONTEXT_ENV}=1")
    return requested


def prefill_budget(requested: int | None, context_length: int, device: str) -> int:
    """--chunked-prefill-size: as given; -1 (SGLang's "no chunking"): the context length, so no prompt
    is ever split; unset: by device (CPU_PREFILL_BUDGET on a CPU)."""
    if requested is None:
        return CPU_PREFILL_BUDGET if device.startswith("cpu") else GPU_PREFILL_BUDGET
    if requested == -1:
        return context_length
    return requested


def apply_overrides(engine, args) -> None:
    """After the model is loaded (EngineCore): tokenizer and template from the flags."""
    tok_path = getattr(args, "tokenizer_path", None)
    if tok_path:
        if not os.path.isdir(tok_path):
            raise ValueError(missing_model_message("--tokenizer-path", tok_path))
        from transformers import AutoTokenizer

        engine.tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        engine.chat_template = getattr(engine.tokenizer, "chat_template", None) or engine.chat_template
    template = getattr(args, "chat_template", None)
    if template:
        engine.chat_template = read_chat_template(template)
        if engine.tokenizer is not None:
            engine.tokenizer.chat_template = engine.chat_template  # saved with it for the other processes


def read_sampling_defaults(model_dir: str | None) -> dict:
    """The model's generation_config.json sampling defaults, checked; {} when there is none."""
    if not model_dir:
        return {}
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return {}
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for k in SAMPLING_DEFAULT_KEYS:
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k == "top_k":
            v = int(v) if v >= 1 else -1  # HF: top_k 0 disables it
        out[k] = v
    if out:
        logger.info("sampling defaults from %s: %s", path, out)
    return out
