"""The main process and the detokenizer load the tokenizer copy the scheduler hands them
(`tokenizer_cache.load_saved_tokenizer`): the embedded folder's copy with the class that folder
remembers, without AutoTokenizer's registries, and the same tokenizer AutoTokenizer would give;
anything else through AutoTokenizer."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from sglang_duet.model_loader.loader import load_model
from sglang_duet.model_loader.tokenizer_cache import load_saved_tokenizer, tokenizer_copy_dir

TEXTS = ["Hello, world!", "  spaces  and\ttabs\n", "ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture
def embedded_folder(tmp_path, monkeypatch, tiny_model_factory):
    """A tiny model placed where the embedded model's converted folder lives, loaded once (the first
    start: it remembers AutoTokenizer's class and keeps the tokenizer copy)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(root))
    folder = root / "smollm2-0123456789abcdef"
    shutil.copytree(tiny_model_factory("qwen2"), folder)
    load_model(str(folder), dtype="float32")
    return str(folder)


def _same(a, b):
    assert type(a) is type(b)
    assert len(a) == len(b) and a.all_special_tokens == b.all_special_tokens
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"]
        ids = a(text)["input_ids"]
        assert a.decode(ids) == b.decode(ids)
    msgs = [{"role": "user", "content": "hi"}]
    if a.chat_template:
        assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)


def test_the_copy_loads_with_the_remembered_class_without_autotokenizer(embedded_folder, monkeypatch):
    import transformers

    copy = tokenizer_copy_dir(embedded_folder)
    want = transformers.AutoTokenizer.from_pretrained(copy, local_files_only=True)

    def refuse(*a, **k):
        raise AssertionError("AutoTokenizer used")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    _same(load_saved_tokenizer(copy), want)


def test_anything_else_goes_through_autotokenizer(embedded_folder, tmp_path, monkeypatch):
    import transformers

    copy = tokenizer_copy_dir(embedded_folder)
    other = tmp_path / "elsewhere"
    shutil.copytree(copy, other)  # the same files, not the embedded folder's copy: no memo applies
    config = os.path.join(copy, "tokenizer_config.json")
    with open(config) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "SomeOtherTokenizer"  # the copy names another class than the memo
    with open(config, "w") as f:
        json.dump(cfg, f)
    calls = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def counting(cls, *a, **k):
        calls.append(a[0])
        return real(cls, *a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counting))
    load_saved_tokenizer(str(other))
    load_saved_tokenizer(copy)  # AutoTokenizer decides what the unknown class name means
    assert calls == [str(other), os.path.abspath(copy)]


def test_the_main_process_loads_the_tokenizer_once(embedded_folder, monkeypatch, tmp_path):
    """The launcher's warm-up thread loads the copy (keyed by real path, whatever path names it) and the
    tokenizer manager takes that tokenizer instead of loading the folder a second time."""
    from manager_utils import RecordingBackend

    from sglang_duet.model_loader import tokenizer_cache
    from sglang_duet.server import io_struct as io
    from sglang_duet.server.launcher import _warm_imports
    from sglang_duet.server.tokenizer_manager import TokenizerManager
    from sglang_duet.server_args import ServerArgs

    copy = tokenizer_copy_dir(embedded_folder)
    link = tmp_path / "link"
    os.symlink(copy, link)
    loaded = {}
    _warm_imports(str(link), loaded)
    warmed = loaded[os.path.realpath(copy)]

    def refuse(folder):
        raise AssertionError(f"loaded {folder} again")

    monkeypatch.setattr(tokenizer_cache, "load_saved_tokenizer", refuse)
    info = io.ReadyInfo(status="ready", tokenizer_dir=copy, context_length=4096, vocab_size=1000, kv_slots=1000)
    tm = TokenizerManager(ServerArgs(), info, RecordingBackend(), tokenizer=warmed)
    assert tm.tokenizer is warmed
    with pytest.raises(AssertionError, match="again"):  # without it, the manager loads the folder
        TokenizerManager(ServerArgs(), info, RecordingBackend())
