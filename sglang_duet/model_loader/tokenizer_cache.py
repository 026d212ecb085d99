"""Tokenizer start-up shortcuts for the embedded model's folder (ours to write in, see embedded.py).

- The class AutoTokenizer chose for the folder is remembered (serving/tokenizer-class.json, per
  transformers version), so later loads skip AutoTokenizer's registries.
- A copy of the loaded tokenizer without the model's config.json (serving/tokenizer-transformers-V/)
  lets the server's other processes load it at once and cheaply (server/launcher.py), and, marked as
  a decode snapshot, the scheduler decode without transformers (decode_tokenizer.py).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)


# The class AutoTokenizer chose for an embedded folder (ours to write in), by transformers version: the
# next start loads that class directly instead of importing AutoTokenizer's registries first (~2-3 s of
# start-up on this CPU). Which class AutoTokenizer picks depends on tokenizer_config.json, config.json's
# model type and the installed version, so it is remembered, never guessed.
_TOKENIZER_MEMO = os.path.join("serving", "tokenizer-class.json")


def _transformers_version() -> str:
    from importlib.metadata import version  # the installed version, without importing transformers

    return version("transformers")


def remembered_tokenizer_class(model_dir: str):
    """The class AutoTokenizer chose for this embedded folder with this transformers version, or None."""
    from sglang_duet.model_loader.embedded import is_embedded_folder

    if not is_embedded_folder(model_dir):
        return None
    try:
        with open(os.path.join(model_dir, _TOKENIZER_MEMO)) as f:
            memo = json.load(f)
        if memo.get("transformers") != _transformers_version():
            return None
        return getattr(importlib.import_module(memo["module"]), memo["class"])
    except (OSError, ValueError, KeyError, AttributeError, ImportError, TypeError):
        return None


def remember_tokenizer_class(model_dir: str, tok) -> None:
    """Note the class of `tok`, which AutoTokenizer chose for this embedded folder (no-op for other folders)."""
    from sglang_duet.model_loader.embedded import is_embedded_folder

    if not is_embedded_folder(model_dir):
        return
    memo = {"transformers": _transformers_version(), "module": type(tok).__module__, "class": type(tok).__name__}
    path = os.path.join(model_dir, _TOKENIZER_MEMO)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.debug("could not remember the tokenizer class in %s: %s", path, e)


def load_saved_tokenizer(folder: str):
    """A tokenizer folder the server's processes hand each other (the embedded model's copy, or the
    scheduler's save in the private socket dir), loaded for the main process and the detokenizer.
    Where it is the embedded folder's copy and its tokenizer_config.json names the class this folder
    remembers (`remembered_tokenizer_class`), that class loads it directly: the class AutoTokenizer
    would pick from that config, without importing AutoTokenizer's registries (about 2 of the main
    process's 3.3 s of CPU for this load on the test machine). Anything else goes through AutoTokenizer."""
    folder = os.path.abspath(folder)
    model_dir = os.path.dirname(os.path.dirname(folder))  # <model>/serving/<copy>
    cls = None
    try:
        if folder == os.path.abspath(tokenizer_copy_dir(model_dir)):
            cls = remembered_tokenizer_class(model_dir)
        if cls is not None:
            with open(os.path.join(folder, "tokenizer_config.json")) as f:
                named = json.load(f).get("tokenizer_class")
            if named not in (cls.__name__, cls.__name__.removesuffix("Fast")):
                cls = None  # the copy says another class: let AutoTokenizer decide
    except (OSError, ValueError, AttributeError):
        cls = None
    if cls is not None:
        return cls.from_pretrained(folder, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenizer_copy_dir(model_dir: str) -> str:
    """Where an embedded folder keeps a copy of its loaded tokenizer without the model's config.json:
    AutoTokenizer loads it in 0.4 s where the folder itself costs 2 s (it reads config.json and imports
    the model's configuration). The server's detokenizer and main process load it from there at once
    (server/launcher.py); it is what the scheduler would hand them, saved the same way, by the same
    transformers version (the version is in the name)."""
    return os.path.join(model_dir, "serving", f"tokenizer-transformers-{_transformers_version()}")


def keep_tokenizer_copy(model_dir: str, tok) -> None:
    """Save `tok` as the folder's tokenizer copy unless one is there (atomically: temp dir, then rename),
    marked as a decode snapshot of `tok` where it can be one (decode_tokenizer.py): the next start's
    scheduler then decodes without importing transformers. A copy an earlier start kept without a
    current mark gets it now, when it is this tokenizer's backend."""
    from sglang_duet.model_loader.decode_tokenizer import has_current_snapshot, write_snapshot_meta

    target = tokenizer_copy_dir(model_dir)
    if os.path.isfile(os.path.join(target, "tokenizer.json")):
        if not has_current_snapshot(target):  # none yet, or one another tokenizers version wrote
            write_snapshot_meta(tok, target)
        return
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=os.path.dirname(target))
        tok.save_pretrained(tmp)
        write_snapshot_meta(tok, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process was first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logger.debug("could not keep a tokenizer copy in %s: %s", target, e)
