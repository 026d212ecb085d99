"""Bad input never gets past the HTTP layer as anything but a 4xx naming the problem.

One emulated server (tokenizer, chat template, --context-length 512 so no request can run long,
--max-request-bytes 1 MB, an API key). Every case of docs/reliability.md's input table is checked
with its exact status and message; then property-based fuzzing (hypothesis) of the three
generation routes asserts: no 5xx, no hang, a well-formed error body, and a server that is still
idle and whole afterwards. Last, junk written straight onto the scheduler's socket is dropped.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import time

import httpx
import msgspec
import orjson
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening_utils import emulated_args, internal_state, server_roles, sse_events, wait_idle
from server_utils import TINY_CONFIG, ServerProcess

pytestmark = pytest.mark.timeout(300)

KEY = "hardening-key"
CTX = 512
VOCAB = 49152
BODY_LIMIT = 1_000_000
FUZZ_EXAMPLES = int(os.environ.get("SGLANG_DUET_FUZZ_EXAMPLES", "100"))  # per route; raise for a deeper run
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(emulated_args("--context-length", str(CTX), "--max-request-bytes", str(BODY_LIMIT)),
                      api_key=KEY)
    yield s
    assert s.stop() == 0, s.log_tail()


def post(server, path, body=None, content=None, headers=None, timeout=30):
    h = dict(server.headers, **(headers or {}))
    if content is not None:
        return httpx.post(server.url(path), content=content, headers=h, timeout=timeout)
    return httpx.post(server.url(path), json=body, headers=h, timeout=timeout)


def err(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    e = r.json()["error"]
    assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str)
    return e


# ---- input validation: (route, body, status, exact message or regex, param) -------------------

C, CH, G = "/v1/completions", "/v1/chat/completions", "/generate"
FITS = ("max_tokens (500) plus the input (100 tokens) is 600 tokens, more than the model's context "
        "length (512 tokens); at most 412 new tokens fit.")
CASES = [
    # unknown / unsupported fields
    (C, {"prompt": "hi", "foo": 1}, 400, "Unrecognized request argument supplied: foo", "foo"),
    (CH, {"messages": MSG, "foo": 1, "bar": 2}, 400, "Unrecognized request arguments supplied: foo, bar", "foo"),
    (CH, {"messages": MSG, "functions": [{"name": "f"}]}, 400, "functions is not supported.", "functions"),
    (CH, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools are not supported.", "tools"),
    (CH, {"messages": MSG, "tool_choice": "required"}, 400,
     'tool_choice must be "none" or "auto": tools are not supported.', "tool_choice"),
    (C, {"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias is not supported.", "logit_bias"),
    (C, {"prompt": "hi", "suffix": "x"}, 400, "suffix is not supported.", "suffix"),
    (G, {"text": "hi", "sampling_params": {"foo": 1}}, 400, "Unknown sampling parameter(s): foo.", "sampling_params"),
    # empty prompts
    (C, {"prompt": ""}, 400, "The prompt is empty.", "prompt"),
    (C, {"prompt": []}, 400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                             "token-id lists.", "prompt"),
    (CH, {"messages": []}, 400, "messages must be a non-empty list.", "messages"),
    (G, {"input_ids": []}, 400, "The prompt is empty.", "prompt"),
    (G, {"text": ""}, 400, "The prompt is empty.", "prompt"),
    (G, {}, 400, "Give exactly one of text or input_ids.", "text"),
    # too long
    (C, {"prompt": [5] * 600}, 400, "The input (600 tokens) is longer than the model's context length (512 tokens).",
     None),
    (G, {"input_ids": [5] * 512}, 400, "The input (512 tokens) is longer than the model's context length "
                                       "(512 tokens).", None),
    (C, {"prompt": "a" * 60_000}, 400,
     re.compile(r"The input \(60000 characters, so more than \d+ tokens\) is longer than the model's context "
                r"length \(512 tokens\)\."), "prompt"),
    (CH, {"messages": [{"role": "user", "content": "hi " * 600}]}, 400,
     re.compile(r"The input \(\d+ tokens\) is longer than the model's context length \(512 tokens\)\."), None),
    # max_tokens over what fits
    (C, {"prompt": [5] * 100, "max_tokens": 500}, 400, FITS, "max_tokens"),
    (CH, {"messages": MSG, "max_completion_tokens": 600}, 400,
     re.compile(r"max_completion_tokens \(600\) plus the input \(\d+ tokens\) is \d+ tokens, more than the "
                r"model's context length \(512 tokens\); at most \d+ new tokens fit\."), "max_completion_tokens"),
    (G, {"input_ids": [5] * 100, "sampling_params": {"max_new_tokens": 500}}, 400,
     FITS.replace("max_tokens", "max_new_tokens"), "max_new_tokens"),
    # sampling ranges
    (C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature must be non-negative, got -0.5.", "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1], got 0.", "top_p"),
    (CH, {"messages": MSG, "top_p": 1.5}, 400, "top_p must be in (0, 1], got 1.5.", "top_p"),
    (C, {"prompt": "hi", "top_k": 0}, 400, "top_k must be -1 (disable), or at least 1, got 0.", "top_k"),
    (G, {"text": "hi", "sampling_params": {"top_k": -2}}, 400, "top_k must be -1 (disable), or at least 1, got -2.",
     "top_k"),
    (C, {"prompt": "hi", "min_p": 2}, 400, "min_p must be in [0, 1], got 2.", "min_p"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be in (0, 2], got 0.",
     "repetition_penalty"),
    (C, {"prompt": "hi", "frequency_penalty": 3}, 400, "frequency_penalty must be in [-2, 2], got 3.",
     "frequency_penalty"),
    (C, {"prompt": "hi", "n": 0}, 400, "n must be in [1, 128], got 0.", "n"),
    (CH, {"messages": MSG, "n": 129}, 400, "n must be in [1, 128], got 129.", "n"),
    (C, {"prompt": ["hi"] * 33, "n": 128, "max_tokens": 1}, 400,
     "One request may ask for at most 4096 sequences (prompts x n), got 4224.", None),
    (C, {"prompt": "hi", "stop": ["a"] * 17}, 400, "stop may hold at most 16 strings, got 17.", "stop"),
    (G, {"text": "hi", "sampling_params": {"stop": "x" * 600}}, 400,
     "stop strings may be at most 512 characters each, got one of 600.", "stop"),
    (CH, {"messages": MSG, "stop": 5}, 400, "stop must be a string or a list of strings.", "stop"),
    (CH, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs must be an integer in [0, 20], got 21.", "top_logprobs"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs must be in [0, 20], got 21.", "logprobs"),
    # token ids
    (C, {"prompt": [1, VOCAB]}, 400, f"Token id {VOCAB} is outside the vocabulary [0, {VOCAB}).", "prompt"),
    (C, {"prompt": [[1, 2], [-1]]}, 400, f"Token id -1 is outside the vocabulary [0, {VOCAB}).", "prompt"),
    (G, {"input_ids": [1, 1.5]}, 400, "input_ids[1] must be an integer token id, got 1.5.", "input_ids"),
    (G, {"input_ids": [[1], ["a"]]}, 400, "input_ids[0] must be an integer token id, got 'a'.", "input_ids"),
    (G, {"input_ids": [True]}, 400, "input_ids[0] must be an integer token id, got True.", "input_ids"),
    (G, {"text": "hi", "sampling_params": {"stop_token_ids": [VOCAB]}}, 400,
     f"stop_token_ids holds {VOCAB}, outside the vocabulary [0, {VOCAB}).", "stop_token_ids"),
    # wrong types
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens must be a positive integer, got '5'.", "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens must be a positive integer, got -1.", "max_tokens"),
    (C, {"prompt": "hi", "stream": "yes"}, 400, "stream must be of type bool, got 'yes'.", "stream"),
    (G, {"text": "hi", "stream": "no"}, 400, "stream must be of type bool, got 'no'.", "stream"),
    (C, {"prompt": "hi", "top_k": 10 ** 30}, 400, "top_k must be an integer, got 1e+30.", "top_k"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature must be a number, got 'hot'.", "temperature"),
    (C, {"prompt": "hi", "seed": "x"}, 400, "seed must be an integer, got 'x'.", "seed"),
    (C, {"prompt": "hi", "ignore_eos": "x"}, 400, "ignore_eos must be a boolean, got 'x'.", "ignore_eos"),
    (CH, {"messages": MSG, "logprobs": "x"}, 400, "logprobs must be of type bool, got 'x'.", "logprobs"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content must be a string or a list of text parts.", "messages"),
    (CH, {"messages": MSG, "user": 5}, 400, "user must be a string.", "user"),
    (G, {"text": "hi", "return_logprob": True, "top_logprobs_num": "x"}, 400,
     "top_logprobs_num must be of type int, got 'x'.", "top_logprobs_num"),
    (G, {"text": "hi", "sampling_params": "x"}, 400, "sampling_params must be an object or a list of 1 objects.",
     "sampling_params"),
    (G, {"text": "hi", "rid": 5}, 400, "rid must be a string.", "rid"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "The model `gpt-4` does not exist.", "model"),
]


@pytest.mark.parametrize("path,body,status,message,param", CASES,
                         ids=[f"{i}-{c[0].strip('/').replace('/', '.')}" for i, c in enumerate(CASES)])
def test_invalid_request(server, path, body, status, message, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    e = err(r)
    if isinstance(message, re.Pattern):
        assert message.fullmatch(e["message"]), e["message"]
    else:
        assert e["message"] == message
    assert e["param"] == param
    assert e["type"] == "invalid_request_error"


RAW_CASES = [
    (b"{bad", "Malformed JSON body: "),
    (b"", "Malformed JSON body: "),
    (b'{"prompt": "\xff\xfe"}', "Malformed JSON body: str is not valid UTF-8"),
    (b"\xff\xfe\x00\x01", "Malformed JSON body: "),
    (b'{"prompt": "hi", "temperature": NaN}', "Malformed JSON body: "),
    (b'{"prompt": "hi", "temperature": 1e999}', "Malformed JSON body: number is infinity"),
    (b"[1, 2]", "The request body must be a JSON object."),
    (b'"prompt"', "The request body must be a JSON object."),
    (b"[" * 5000, "Malformed JSON body: "),  # nesting deeper than the parser's limit
]


@pytest.mark.parametrize("raw,prefix", RAW_CASES, ids=[str(i) for i in range(len(RAW_CASES))])
@pytest.mark.parametrize("path", [C, CH, G])
def test_malformed_body(server, path, raw, prefix):
    r = post(server, path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert err(r)["message"].startswith(prefix)


def test_body_size_limit(server):
    big = orjson.dumps({"prompt": "a" * BODY_LIMIT})
    r = post(server, C, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert err(r)["message"] == (f"The request body ({len(big)} bytes) is larger than the limit ({BODY_LIMIT} bytes; "
                                 f"the server's --max-request-bytes).")
    assert err(r)["code"] == "request_too_large"

    def chunks():  # chunked transfer: no Content-Length to refuse early, counted as it arrives
        for _ in range(20):
            yield b" " * 100_000

    r = httpx.post(server.url(G), content=chunks(), headers=server.headers, timeout=30)
    assert r.status_code == 413
    assert err(r)["message"].startswith(f"The request body (more than {BODY_LIMIT} bytes) is larger than the limit")
    # just under the limit is served (and fails only on what it says)
    r = post(server, G, content=b'{"text": "hi", "pad": "' + b"x" * (BODY_LIMIT - 100) + b'", '
                                b'"sampling_params": {"max_new_tokens": 2}}',
             headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def test_sglang_extensions_accepted(server):
    """The SGLang/vLLM fields we accept on the OpenAI routes do what they say."""
    body = {"prompt": "hi", "max_tokens": 6, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 6,
            "ignore_eos": True, "stop_token_ids": [2], "skip_special_tokens": True, "no_stop_trim": False,
            "spaces_between_special_tokens": True, "user": "u1", "seed": 3}
    r = post(server, C, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    r = post(server, CH, {"messages": MSG, "max_tokens": 3, "store": False, "metadata": {"a": "b"},
                          "parallel_tool_calls": False, "tool_choice": "none", "modalities": ["text"],
                          "chat_template_kwargs": {}})
    assert r.status_code == 200, r.text
    # /generate ignores unknown top-level fields, as SGLang's does
    r = post(server, G, {"text": "hi", "sampling_params": {"max_new_tokens": 2}, "lora_path": None, "custom": 1})
    assert r.status_code == 200, r.text


def test_routes_need_the_key(server):
    routes = [("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", C), ("POST", CH), ("POST", G),
              ("GET", "/get_server_info"), ("GET", "/get_model_info"), ("GET", "/metrics"),
              ("GET", "/health_generate"), ("GET", "/no-such-route")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url(path), headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (method, path, headers)
            assert err(r)["code"] == "invalid_api_key"
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200  # the only open route
    r = httpx.get(server.url("/no-such-route"), headers=server.headers, timeout=10)
    assert r.status_code == 404 and err(r)
    r = httpx.get(server.url(C), headers=server.headers, timeout=10)
    assert r.status_code == 405 and err(r)


def test_binds_localhost_and_private_ipc_dir(server):
    from sglang_duet.server_args import ServerArgs

    assert ServerArgs().host == "127.0.0.1"
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log_tail(1 << 20)
    _, root = server_roles(server.proc.pid)
    assert root and os.stat(root).st_mode & 0o777 == 0o700


# ---- property-based fuzzing ---------------------------------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=False),
                       st.text(max_size=20))
_json = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=12)


def _or_junk(valid):
    # Valid values 7 times in 8, anything JSON otherwise: with a dozen fields per body, a higher junk
    # rate would only ever exercise the validators, never generation.
    # (one_of(valid, junk) would not do: hypothesis favours its later branches, and it shrinks
    # towards the first, hence valid first.)
    return st.integers(0, 7).flatmap(lambda i: valid if i < 7 else _json)


_small = st.integers(0, 12)
_positive = st.integers(1, 12)  # OpenAI's max_tokens (0 is a 400 there, as in OpenAI and SGLang)
_ids = st.lists(st.integers(0, VOCAB + 10), min_size=0, max_size=20)
_text = st.text(max_size=40)
_stop = st.one_of(_text.filter(bool), st.lists(_text.filter(bool), max_size=4))
_common = {
    "max_tokens": _or_junk(_positive), "temperature": _or_junk(st.floats(0, 2)),
    "top_p": _or_junk(st.floats(0.001, 1)), "top_k": _or_junk(st.one_of(st.just(-1), st.integers(1, 50))),
    "min_p": _or_junk(st.floats(0, 1)), "frequency_penalty": _or_junk(st.floats(-2, 2)),
    "presence_penalty": _or_junk(st.floats(-2, 2)), "repetition_penalty": _or_junk(st.floats(0.01, 2)),
    "n": _or_junk(st.integers(1, 3)),
    "stop": _or_junk(_stop), "seed": _or_junk(st.integers(-(2 ** 63), 2 ** 64)), "stream": _or_junk(st.booleans()),
    "stream_options": _or_junk(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": _or_junk(st.booleans()), "min_tokens": _or_junk(_small),
    "stop_token_ids": _or_junk(st.lists(st.integers(0, VOCAB), max_size=3)), "user": _or_junk(_text),
}
COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": _or_junk(st.one_of(_text, st.lists(_text, max_size=3), _ids, st.lists(_ids, max_size=3)))},
    optional={**_common, "echo": _or_junk(st.booleans()), "logprobs": _or_junk(st.integers(0, 5)),
              "model": _or_junk(st.just("smollm2-135m"))})
_message = st.fixed_dictionaries({"role": _or_junk(st.sampled_from(["user", "system", "assistant"])),
                                  "content": _or_junk(st.one_of(_text, st.lists(st.fixed_dictionaries(
                                      {"type": st.just("text"), "text": _text}), max_size=2)))})
CHAT_BODY = st.fixed_dictionaries(
    # Chat's default max_tokens runs to the end of the context (~0.4 s here): 1 example in 8.
    {"messages": _or_junk(st.lists(_message, min_size=1, max_size=3)),
     "max_tokens": st.integers(0, 7).flatmap(lambda i: _or_junk(_positive) if i < 7 else st.none())},
    optional={**{k: v for k, v in _common.items() if k != "max_tokens"}, "logprobs": _or_junk(st.booleans()), "top_logprobs": _or_junk(st.integers(0, 5)),
              "max_completion_tokens": _or_junk(_positive),
              "response_format": _or_junk(st.just({"type": "text"})),
              "tool_choice": _or_junk(st.sampled_from(["none", "auto"])),
              "chat_template_kwargs": _or_junk(st.just({}))})
_sampling = st.fixed_dictionaries({}, optional={
    "max_new_tokens": _or_junk(_small), "min_new_tokens": _or_junk(_small),
    **{k: v for k, v in _common.items() if k not in ("max_tokens", "n", "stream", "stream_options", "user",
                                                     "min_tokens")},
    "logprobs": _or_junk(st.booleans()), "top_logprobs": _or_junk(st.integers(0, 5)),
    "skip_special_tokens": _or_junk(st.booleans()), "no_stop_trim": _or_junk(st.booleans())})
_generate_input = _or_junk(st.one_of(
    st.fixed_dictionaries({"text": _or_junk(st.one_of(_text, st.lists(_text, min_size=1, max_size=3)))}),
    st.fixed_dictionaries({"input_ids": _or_junk(st.one_of(_ids, st.lists(_ids, min_size=1, max_size=3)))})))
GENERATE_BODY = st.tuples(_generate_input, st.fixed_dictionaries({}, optional={
    "sampling_params": _or_junk(st.one_of(_sampling, st.lists(_sampling, max_size=3))),
    "stream": _or_junk(st.booleans()), "return_logprob": _or_junk(st.booleans()),
    "top_logprobs_num": _or_junk(st.integers(0, 5)), "rid": _or_junk(_text), "junk_field": _json})
).map(lambda t: {**t[0], **t[1]} if isinstance(t[0], dict) else {"text": t[0], **t[1]})


def check_response(server, path, body, statuses=None) -> None:
    """No 5xx, no hang (30 s timeout), an OpenAI error body for 4xx, a complete SSE stream for 200."""
    raw = json.dumps(body).encode()  # stdlib: any int size, Infinity; orjson refuses both
    with httpx.stream("POST", server.url(path), content=raw, timeout=30,
                      headers={**server.headers, "Content-Type": "application/json"}) as r:
        text = r.read().decode()
        if statuses is not None:
            statuses[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, text, body)
        if r.status_code >= 400:
            assert orjson.loads(text)["error"]["message"], text
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = sse_events(text.splitlines())
            assert events and events[-1] == "[DONE]", text
            assert not any(isinstance(e, dict) and "error" in e for e in events), text
        else:
            orjson.loads(text)


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


def test_fuzz_routes_no_5xx_no_hang(server):
    import collections

    sched_before = server_roles(server.proc.pid)[0]["scheduler"]
    statuses = {p: collections.Counter() for p in (C, CH, G)}

    @FUZZ
    @given(body=COMPLETION_BODY)
    def completions(body):
        check_response(server, C, body, statuses[C])

    @FUZZ
    @given(body=CHAT_BODY)
    def chat(body):
        check_response(server, CH, body, statuses[CH])

    @FUZZ
    @given(body=GENERATE_BODY)
    def generate(body):
        check_response(server, G, body, statuses[G])

    completions()
    chat()
    generate()
    print({p: dict(c) for p, c in statuses.items()})
    for p, c in statuses.items():  # the fuzz must reach generation, not only the validators
        assert c[200] >= FUZZ_EXAMPLES // 10, (p, c)
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    assert server_roles(server.proc.pid)[0]["scheduler"] == sched_before  # never restarted / crashed
    st_ = wait_idle(server)
    assert st_["kv_free_slots"] == st_["kv_total_slots"]
    assert st_["requests"]["submitted"] == sum(st_["requests"][k] for k in ("finished", "failed", "aborted"))


@pytest.mark.timeout(240)
def test_fuzz_generate_real_sampler():
    """/generate against a real (tiny, random-weight) model: extreme sampling values reach the sampler."""
    with ServerProcess(["--load-format", "dummy", "--model-config", TINY_CONFIG, "--context-length", "128"]) as s:
        ids = st.lists(st.integers(0, 511), min_size=1, max_size=16)
        sampling = st.fixed_dictionaries({"max_new_tokens": st.integers(0, 8)}, optional={
            "temperature": st.one_of(st.floats(0, 2), st.sampled_from([1e-30, 1e-6, 2.0])),
            "top_p": st.one_of(st.floats(1e-30, 1), st.just(1e-300)), "top_k": st.integers(-1, 600),
            "min_p": st.one_of(st.floats(0, 1), st.just(1.0)), "frequency_penalty": st.floats(-2, 2),
            "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.one_of(st.floats(1e-9, 2), st.just(1e-300)),
            "min_new_tokens": st.integers(0, 8), "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
            "seed": st.integers(-(2 ** 63), 2 ** 64 - 1), "ignore_eos": st.booleans(),
            "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)})
        body = st.fixed_dictionaries({"input_ids": st.one_of(ids, st.lists(ids, min_size=1, max_size=4)),
                                      "sampling_params": sampling},
                                     optional={"stream": st.booleans(), "return_logprob": st.booleans(),
                                               "top_logprobs_num": st.integers(0, 20)})

        @FUZZ
        @given(body=body)
        def generate(body):
            mx = body["sampling_params"]["max_new_tokens"]
            if body["sampling_params"].get("min_new_tokens", 0) > mx:
                body["sampling_params"]["min_new_tokens"] = mx
            check_response(s, G, body)

        generate()
        st_ = wait_idle(s)
        assert st_["kv_free_slots"] == st_["kv_total_slots"]


# ---- the IPC sockets accept typed messages only -------------------------------------------------


class _Exploit:
    """Unpickling this would create a file: proof that nothing on our sockets is ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_junk_on_ipc_sockets_is_dropped(server):
    from sglang_duet.server import io_struct as io

    roles, root = server_roles(server.proc.pid)
    marker = os.path.join(tempfile.mkdtemp(), "unpickled")
    junk = [b"", b"\x00garbage\xff", pickle.dumps(_Exploit(marker)), orjson.dumps({"rid": "x"}),
            msgspec.msgpack.encode({"type": "gen", "rid": "x"}),  # right tag name, wrong shape
            io.encode(io.BatchStrOut([])),  # a real message, on the wrong socket
            io.encode(io.GenerateReq("junk-1", [1, 2, 3], {1: 2}, 0.0)),  # add_request raises TypeError
            io.encode(io.GenerateReq("junk-2", [1, 10 ** 9], {}, 0.0)),  # outside the vocabulary
            io.encode(io.GenerateReq("junk-3", [1, 2], {"temperature": "hot"}, 0.0)),
            io.encode(io.AbortReq("no-such-request"))]
    ctx = zmq.Context()
    try:
        for name in ("scheduler", "detokenizer", "main"):
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(f"ipc://{root}/{name}")
            for msg in junk:
                s.send(msg)
            s.close()
    finally:
        ctx.term()
    time.sleep(1.0)
    assert not os.path.exists(marker)
    assert server_roles(server.proc.pid)[0] == roles  # nobody crashed or restarted
    log = server.log_tail(1 << 20)
    for who in ("scheduler", "detokenizer"):
        assert re.search(rf"{who}\] ERROR dropping an undecodable message", log), log[-3000:]
    assert re.search(r"^\[[-\d :,]+\] ERROR dropping an undecodable message", log, re.M), log[-3000:]  # main
    assert "add_request(junk-1) failed" in log
    r = post(server, G, {"text": "hi", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3
    assert internal_state(server)["dead"] is None
