"""SGLang's flags (issue 17): parsed and checked without a model, then one tiny-model server that
takes its tokenizer, chat template and sampling defaults from where the flags and the model folder say."""
from __future__ import annotations

import json
import os
import shutil
import types

import httpx
import pytest

from hardening_utils import SMOLLM_CONFIG
from server_utils import ServerProcess


def parse(*argv):
    from sglang_duet.server.args import parse_args

    return parse_args(list(argv))


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_flags_parse():
    a = parse("--log-level", "DEBUG", "--chunked-prefill-size", "-1", "--schedule-policy", "lpm",
              "--disable-radix-cache", "--enable-metrics", "--trust-remote-code", "--log-requests",
              "--watchdog-timeout", "30")
    assert (a.log_level, a.chunked_prefill_size, a.schedule_policy, a.watchdog_timeout) == ("debug", -1, "lpm", 30.0)
    assert a.disable_radix_cache and a.enable_metrics and a.trust_remote_code and a.log_requests
    assert parse().chunked_prefill_size is None and parse().watchdog_timeout == 300.0


def test_bad_flags_name_themselves(capsys, tmp_path):
    assert "--chunked-prefill-size 0: must be positive, or -1 for no chunking" in refused(
        capsys, "--chunked-prefill-size", "0")
    assert "--watchdog-timeout 0.0: must be positive" in refused(capsys, "--watchdog-timeout", "0")
    assert "invalid choice: 'loud'" in refused(capsys, "--log-level", "LOUD")
    assert "invalid choice: 'random'" in refused(capsys, "--schedule-policy", "random")
    err = refused(capsys, "--model-path", "Qwen/Qwen2.5-0.5B-Instruct")
    assert "looks like a Hugging Face hub id" in err and "no network access" in err and "pass a local folder" in err
    err = refused(capsys, "--tokenizer-path", "org/tok")
    assert "--tokenizer-path org/tok: not a local folder" in err
    assert f"--model-path {tmp_path}/nope: no such file or directory" in refused(
        capsys, "--model-path", f"{tmp_path}/nope")
    assert "--chat-template /no/such.jinja: no such file" in refused(capsys, "--chat-template", "/no/such.jinja")


def test_prefill_budget():
    from sglang_duet.model_loader.serving_config import (
        CPU_PREFILL_BUDGET, GPU_PREFILL_BUDGET, prefill_budget,
    )

    assert prefill_budget(None, 4096, "cpu") == CPU_PREFILL_BUDGET < GPU_PREFILL_BUDGET == prefill_budget(None, 4096, "cuda")
    assert prefill_budget(-1, 4096, "cpu") == 4096  # no chunking: any prompt fits one step
    assert prefill_budget(300, 4096, "cuda") == 300


def test_context_length_beyond_the_model_is_refused(monkeypatch):
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.model_loader.serving_config import ALLOW_LONGER_CONTEXT_ENV
    from sglang_duet.server_args import ServerArgs

    monkeypatch.delenv(ALLOW_LONGER_CONTEXT_ENV, raising=False)
    args = ServerArgs(executor="emulated", model_config=SMOLLM_CONFIG, max_total_tokens=1024, context_length=8193)
    with pytest.raises(ValueError, match=r"--context-length 8193 is greater than the model's context length \(8192"):
        EngineCore(args)
    monkeypatch.setenv(ALLOW_LONGER_CONTEXT_ENV, "1")  # SGLang's escape hatch
    assert EngineCore(args).context_length == 8193
    args.context_length, args.chunked_prefill_size = 4096, -1
    e = EngineCore(args)
    assert e.core.config.chunked_prefill_size == 4096


def test_overrides_and_sampling_defaults(tiny_model_factory, tmp_path):
    from sglang_duet.model_loader.serving_config import apply_overrides, read_chat_template, read_sampling_defaults

    src = tiny_model_factory("llama")
    engine = types.SimpleNamespace(tokenizer=None, chat_template="old")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    apply_overrides(engine, types.SimpleNamespace(tokenizer_path=src, chat_template=str(tpl)))
    assert engine.tokenizer is not None and engine.chat_template == tpl.read_text()
    assert engine.tokenizer.chat_template == tpl.read_text()  # saved with the tokenizer for the other processes
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": "X"}))
    assert read_chat_template(str(tmp_path / "t.json")) == "X"
    with pytest.raises(ValueError, match="hub id"):
        apply_overrides(engine, types.SimpleNamespace(tokenizer_path="org/name", chat_template=None))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "do_sample": True, "repetition_penalty": "x", "min_p": True}))
    assert read_sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": -1}
    assert read_sampling_defaults(None) == {} and read_sampling_defaults(src) == {}


@pytest.mark.timeout(240)
def test_tokenizer_template_and_generation_config_flags(tiny_model_factory, tmp_path):
    """A model folder whose generation_config.json says greedy, served with --tokenizer-path and
    --chat-template: requests without a temperature are greedy (equal whatever their seed), the
    template is the file's."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    tok = tmp_path / "tok"
    os.makedirs(tok)
    for f in os.listdir(model):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(model / f, tok / f)
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    with ServerProcess(["--model-path", str(model), "--tokenizer-path", str(tok), "--chat-template", str(tpl),
                        "--context-length", "256"]) as s:
        ids = httpx.post(s.url("/tokenize"), json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30).json()
        text = httpx.post(s.url("/detokenize"), json={"tokens": ids["tokens"]}, timeout=30).json()["text"]
        assert text == "<<hi>>"
        outs = []
        for seed in (1, 2, 3):
            r = httpx.post(s.url("/v1/completions"), json={"prompt": "hello", "max_tokens": 8, "seed": seed,
                                                             "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            outs.append(r.json()["choices"][0]["text"])
        assert outs[0] == outs[1] == outs[2]
