"""The server scheduler's tokenizer without transformers: decode and the eos id, nothing else.

The scheduler process decodes only (the stop-string check, detokenizer.StopChecker) and needs the
eos id; importing transformers for that cost ~1.5 s of CPU in every server start, on a 2-core box
shared with two other processes that import at the same time (issue 18).

What it loads is a snapshot of the transformers tokenizer, never the model folder's tokenizer.json:
transformers rewrites the backend while loading (named special tokens registered as special, classes
such as Qwen2Tokenizer that rebuild it from vocab and merges, the Mistral regex patch), so the
folder's own file may decode differently. The snapshot is the embedded folder's tokenizer copy
(tokenizer_cache.py: `save_pretrained` of the loaded tokenizer, i.e. its Rust backend serialized)
plus SNAPSHOT_META, written beside it by the start that saved the copy: what transformers derived
(eos id, chat template) and the proof that its decode is the backend's (the stock decode, no
clean-up pass, and the copy's file equal to the live backend). `DecodeTokenizer.decode(ids, ...)`
is then the same Rust call on the same state as the transformers tokenizer's decode. Without a
valid snapshot (first start, another transformers or tokenizers version, a tokenizer with its own
decoding, a folder that is not the embedded one) the loader uses transformers, as before.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Callable

logger = logging.getLogger(__name__)

SNAPSHOT_META = "sglang-duet-decode.json"
_META_VERSION = 1


class DecodeTokenizer:
    """decode / eos_token_id / chat_template of a transformers tokenizer, from its snapshot folder.

    `folder` is a tokenizer folder transformers loads as the same tokenizer: the server hands it to
    the main and detokenizer processes (scheduler_proc.ready_info). Structured output needs the
    transformers tokenizer (xgrammar reads it): `transformers_tokenizer()` loads it on first use, with
    `load_transformers` (the loader passes its own transformers path for the model folder, which skips
    AutoTokenizer's registries: ~1.5 s of the first grammar's ~2.6 s) or else AutoTokenizer on `folder`."""

    def __init__(self, backend, eos_token_id: int | None, chat_template: str | None, folder: str,
                 load_transformers: Callable[[], Any] | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.folder = folder
        self._load_transformers = load_transformers
        self._transformers = None

    def decode(self, token_ids, skip_special_tokens: bool = False, **_ignored) -> str:
        """transformers' decode of a fast tokenizer with a stock decode: the backend's decode.
        `spaces_between_special_tokens` (and other keywords) are ignored there too."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def transformers_tokenizer(self):
        """The transformers tokenizer of the same folder, loaded (and transformers imported) on first call."""
        if self._transformers is None:
            if self._load_transformers is not None:
                tok = self._load_transformers()
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            if self.chat_template is not None:
                tok.chat_template = self.chat_template
            self._transformers = tok
        return self._transformers


def _versions() -> dict[str, str]:
    import tokenizers

    from sglang_duet.model_loader.tokenizer_cache import _transformers_version

    return {"transformers": _transformers_version(), "tokenizers": tokenizers.__version__}


def _current_meta(folder: str) -> dict | None:
    """The folder's SNAPSHOT_META if it was written by these versions (of this module, transformers
    and tokenizers), else None."""
    try:
        with open(os.path.join(folder, SNAPSHOT_META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != _META_VERSION or meta.get("versions") != _versions():
        return None
    return meta


def has_current_snapshot(folder: str) -> bool:
    return _current_meta(folder) is not None


def load_snapshot(folder: str, load_transformers: Callable[[], Any] | None = None) -> DecodeTokenizer | None:
    """The DecodeTokenizer of a snapshot folder, or None where there is no valid one."""
    try:
        meta = _current_meta(folder)
        if meta is None:
            return None
        eos, template = meta["eos_token_id"], meta["chat_template"]
        if not (eos is None or isinstance(eos, int)) or not (template is None or isinstance(template, str)):
            return None
        import tokenizers

        backend = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
        logger.debug("no decode snapshot in %s: %s", folder, e)
        return None
    except Exception as e:  # noqa: BLE001 - tokenizers' own errors (a damaged file): transformers instead
        logger.debug("unreadable decode snapshot in %s: %s", folder, e)
        return None
    return DecodeTokenizer(backend, eos, template, folder, load_transformers)


def snapshot_meta(tok: Any, folder: str) -> dict | None:
    """What SNAPSHOT_META holds for `tok` saved in `folder`, or None when a DecodeTokenizer of that
    folder would not decode exactly as `tok` does."""
    from sglang_duet.detokenizer import _rust_backend

    rust = _rust_backend(tok)  # the stock decode, no clean-up pass: decode is the backend's
    if rust is None:
        return None
    template = getattr(tok, "chat_template", None)
    eos = getattr(tok, "eos_token_id", None)
    if not (template is None or isinstance(template, str)) or not (eos is None or isinstance(eos, int)):
        return None  # e.g. a dict of named templates: keep transformers
    try:
        import tokenizers

        saved = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        if saved.to_str() != rust.to_str():
            return None  # the copy is not this backend (another version saved it): no snapshot
    except Exception as e:  # noqa: BLE001 - unreadable copy: no snapshot
        logger.debug("not snapshotting %s: %s", folder, e)
        return None
    return {"version": _META_VERSION, "versions": _versions(), "eos_token_id": eos, "chat_template": template}


def write_snapshot_meta(tok: Any, folder: str) -> bool:
    """Mark `folder` (a save_pretrained copy of `tok`) as a snapshot of `tok`; False where it cannot be one."""
    meta = snapshot_meta(tok, folder)
    if meta is None:
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-meta-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(folder, SNAPSHOT_META))
    except OSError as e:
        logger.debug("could not write %s in %s: %s", SNAPSHOT_META, folder, e)
        return False
    return True
