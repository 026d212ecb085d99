"""What SGLang users reach for, against one emulated server started with SGLang's flags:
SGLang's routes (/tokenize, /detokenize, /flush_cache, /abort_request, /openapi.json, /docs),
SGLang's request fields, and the defects of issue 17 seen through HTTP (bounded work per request,
chat_template_kwargs, max_tokens 0, roles / response_format / tools, a client hanging up mid-upload).
Then a second server whose scheduler hangs on purpose: the watchdog ends it with a non-zero code.
"""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from hardening_utils import emulated_args, sse_events, wait_idle
from server_utils import ServerProcess

pytestmark = pytest.mark.timeout(300)

CTX = 512
MSG = [{"role": "user", "content": "hi"}]
C, CH, G = "/v1/completions", "/v1/chat/completions", "/generate"
# SGLang's flags, all accepted at once (each is checked by what it changes, where it changes anything).
SGLANG_FLAGS = ("--context-length", str(CTX), "--log-requests", "--chunked-prefill-size", "-1",
                "--schedule-policy", "lpm", "--enable-metrics", "--trust-remote-code",
                "--log-level", "INFO", "--watchdog-timeout", "120",
                # 20 ms a step: a 400-token stream lasts seconds, so an abort finds it running
                "--emulated-step-ms", "20")


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(emulated_args(*SGLANG_FLAGS))
    yield s
    assert s.stop() == 0, s.log_tail()


def post(server, path, body, timeout=60):
    return httpx.post(server.url(path), json=body, timeout=timeout)


def error_of(r, status=400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ---- defect 1: the work of one request is bounded before it starts -----------------------------


def test_request_size_bounds(server):
    e = error_of(post(server, CH, {"messages": [{"role": "user", "content": ""}] * (CTX + 1), "max_tokens": 1}))
    assert e["param"] == "messages" and e["message"].startswith(f"messages holds {CTX + 1} messages")
    e = error_of(post(server, CH, {"messages": [{"role": "u" * 100_000, "content": "hi"}], "max_tokens": 1}))
    assert e["param"] == "messages" and e["message"].startswith("messages[0].role must be one of")
    assert len(e["message"]) < 300  # the 100k-character role is not echoed back
    e = error_of(post(server, CH, {"messages": [{"role": "user", "name": "n" * 300, "content": "hi"}]}))
    assert e["param"] == "messages" and "name" in e["message"]
    # many long messages: refused on their characters, before templating
    e = error_of(post(server, CH, {"messages": [{"role": "user", "content": "a" * 2000}] * 100, "max_tokens": 1}))
    assert e["code"] == "context_length_exceeded" and e["param"] == "messages"
    # a batch whose prompts each fit, but which holds more text than one request may (8 M characters):
    # refused before any prompt is tokenized
    e = error_of(post(server, C, {"prompt": ["a" * 41_000] * 200, "max_tokens": 1}), 413)
    assert e["param"] == "prompt" and e["code"] == "request_too_large"
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


# ---- defect 4, 5, 6: input that used to slip through ------------------------------------------


@pytest.mark.parametrize("kwargs", [{"messages": 1}, {"self": 1}, {"add_generation_prompt": False}])
def test_chat_template_kwargs_that_collide_are_a_400(server, kwargs):
    e = error_of(post(server, CH, {"messages": MSG, "max_tokens": 2, "chat_template_kwargs": kwargs}))
    assert e["param"] == "chat_template_kwargs" and next(iter(kwargs)) in e["message"]


def test_max_tokens_zero(server):
    before = wait_idle(server)["requests"]["submitted"]
    for path, body in ((C, {"prompt": "hi"}), (CH, {"messages": MSG})):
        for field in ("max_tokens", "max_completion_tokens"):
            e = error_of(post(server, path, {**body, field: 0}))
            assert e["param"] == field and e["message"] == f"{field} must be a positive integer, got 0."
    # SGLang's native API: an empty completion, nothing generated or billed
    r = post(server, G, {"text": "hi", "sampling_params": {"max_new_tokens": 0}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["completion_tokens"] == 0 and out["meta_info"]["finish_reason"]["type"] == "length"
    st = wait_idle(server)
    assert st["requests"]["submitted"] == before + 1 == st["requests"]["finished"] + st["requests"]["failed"] + \
        st["requests"]["aborted"]


BAD_CHAT = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "", "content": "hi"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user<|im_end|>", "content": "hi"}]}, "messages[0].role must be one of"),
    ({"messages": MSG, "response_format": False}, "response_format must be an object"),
    ({"messages": MSG, "response_format": []}, "response_format must be an object"),
    ({"messages": MSG, "response_format": 0}, "response_format must be an object"),
    ({"messages": MSG, "response_format": ""}, "response_format must be an object"),
    ({"messages": MSG, "response_format": {}}, 'response_format.type must be "text"'),
    ({"messages": MSG, "response_format": {"type": "structural_tag"}},
     "response_format: structural_tag is not a valid grammar: needs a non-empty list 'structures'"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format.json_schema must be an obj"),
    ({"messages": MSG, "tools": 0}, "tools must be a list"),
    ({"messages": [{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add"}}]},
                   {"role": "user", "content": "and?"}]}, "messages[1]: this model's chat template does not render"),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "x"}]}, "messages[0]: this model's chat"),
    # SGLang fields: features this server does not have, and wrong types
    ({"messages": MSG, "return_hidden_states": True}, "return_hidden_states is not supported"),
    ({"messages": MSG, "lora_path": "adapter"}, "lora_path is not supported"),
    ({"messages": MSG, "regex": 5}, "regex must be of type str"),
    ({"messages": MSG, "regex": "(a"}, "regex is not a valid grammar"),
    ({"messages": MSG, "separate_reasoning": "yes"}, "separate_reasoning must be of type bool"),
    ({"messages": MSG, "priority": "high"}, "priority must be of type int"),
    ({"messages": MSG, "reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
    ({"messages": MSG, "rid": ["a", "b"]}, "rid must be a string or a list of 1"),
]


@pytest.mark.parametrize("body,message", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_invalid_chat_is_a_400(server, body, message):
    e = error_of(post(server, CH, {"max_tokens": 2, **body}))
    assert e["message"].startswith(message), e["message"]


def test_sglang_fields_accepted(server):
    """What sglang-router forwards (its defaults and routing hints) is accepted; honoured ones work."""
    body = {"messages": [{"role": "User", "content": "hi"}], "max_tokens": 3, "separate_reasoning": True,
            "stream_reasoning": True, "continue_final_message": False, "return_hidden_states": False,
            "bootstrap_host": None, "bootstrap_room": 7, "routed_dp_rank": 0, "priority": 1, "extra_key": "k",
            "cache_salt": "s", "lora_path": None, "custom_params": None, "return_token_ids": True,
            "return_prompt_token_ids": True, "return_meta_info": True, "reasoning_effort": "none"}
    r = post(server, CH, body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert len(c["token_ids"]) == 3 and c["prompt_token_ids"] and c["meta_info"]["completion_tokens"] == 3
    r = post(server, C, {"prompt": "hi", "max_tokens": 2, "return_token_ids": True, "bootstrap_port": 1,
                         "response_format": {"type": "text"}, "priority": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2, r.text
    # chat input_ids: the template is skipped, the ids are the prompt
    r = post(server, CH, {"messages": MSG, "input_ids": [5, 6, 7, 8], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4, r.text


# ---- SGLang's routes ----------------------------------------------------------------------------


def test_openapi_and_docs(server):
    r = httpx.get(server.url("/openapi.json"), timeout=10)
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in (G, C, CH, "/tokenize", "/detokenize", "/flush_cache", "/abort_request", "/v1/models"):
        assert p in paths, p
    r = httpx.get(server.url("/docs"), timeout=10)
    assert r.status_code == 200 and "swagger" in r.text.lower()


def test_tokenize_detokenize(server):
    r = post(server, "/tokenize", {"prompt": "hello world"})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == CTX
    r = post(server, "/detokenize", {"tokens": t["tokens"]})
    assert r.status_code == 200 and r.json()["text"] == "hello world"
    r = post(server, "/tokenize", {"prompt": ["a", "b c"]})
    assert r.json()["count"] == [len(x) for x in r.json()["tokens"]]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    gen = post(server, "/tokenize", {"messages": chat}).json()["tokens"]
    cont = post(server, "/tokenize", {"messages": chat, "continue_final_message": True}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": cont}).json()["text"].endswith("The answer is")
    assert not post(server, "/detokenize", {"tokens": gen}).json()["text"].endswith("The answer is")
    assert error_of(post(server, "/tokenize", {}))["param"] == "prompt"
    assert error_of(post(server, "/detokenize", {"tokens": [10 ** 9]}))["param"] == "tokens"


def test_embeddings_and_flush_cache(server):
    e = error_of(post(server, "/v1/embeddings", {"input": "hi"}))
    assert e["code"] == "model_not_embedding"
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url("/flush_cache"), timeout=10)
        assert r.status_code == 200 and r.text.startswith("Cache flushed.")


def test_abort_request_ends_a_running_stream(server):
    rid = "abort-me-1"
    body = {"text": "hi", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", server.url(G), json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:  # the first token: the request runs
            if line.startswith("data: {"):
                break
        a = post(server, "/abort_request", {"rid": rid})
        assert a.status_code == 200 and a.json()["aborted"] == [rid]
        events = sse_events(list(lines))
    assert events[-1] == "[DONE]"
    last = events[-2]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and last["completion_tokens"] < 400
    assert error_of(post(server, "/abort_request", {}))["param"] == "rid"
    st = wait_idle(server)
    assert st["kv_free_slots"] == st["kv_total_slots"]
    # the rid is free again
    r = post(server, G, {"text": "hi", "rid": rid, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text


# ---- defect 8: a client that hangs up mid-upload ----------------------------------------------


def test_client_gone_mid_upload_is_not_an_internal_error(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"text\": ")
    deadline = time.monotonic() + 30
    while "client disconnected while sending POST /generate" not in server.log_tail(1 << 20):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    log = server.log_tail(1 << 20)
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_log_requests(server):
    r = post(server, C, {"prompt": "logged prompt", "max_tokens": 1})
    assert r.status_code == 200
    log = server.log_tail(1 << 20)
    assert 'request POST /v1/completions: {"prompt":"logged prompt"' in log.replace(", ", ",").replace('": ', '":')
    assert " finished: " in log


# ---- the watchdog -----------------------------------------------------------------------------


def test_watchdog_ends_a_server_whose_scheduler_hangs(monkeypatch):
    monkeypatch.setenv("SGLANG_DUET_TEST_HANG_RID", "hang-me")
    s = ServerProcess(emulated_args("--watchdog-timeout", "2"))
    try:
        results = []

        def call():
            try:
                results.append(httpx.post(s.url(G), json={"text": "hi", "rid": "hang-me"}, timeout=120).status_code)
            except httpx.HTTPError as e:
                results.append(type(e).__name__)

        t = threading.Thread(target=call)
        t.start()
        rc = s.proc.wait(120)
        t.join(30)
        log = s.log_tail(1 << 20)
        assert rc != 0, log
        assert "the scheduler loop hangs on request hang-me" in log
        assert "it is hung; the server is shutting down" in log
        assert results and results[0] in (503, "RemoteProtocolError", "ReadError"), results
    finally:
        s.stop()


# ---- the prefix cache through HTTP ------------------------------------------------------------


def test_prefix_cache_hits_and_flush(server):
    """A repeated prompt is served from the prefix cache (reported as cached tokens, SGLang's
    meta_info and OpenAI's usage.prompt_tokens_details); /flush_cache empties it."""
    body = {"input_ids": list(range(100, 180)), "sampling_params": {"max_new_tokens": 2}}
    first = post(server, G, body).json()["meta_info"]
    second = post(server, G, body).json()["meta_info"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] == 79  # all but the last prompt token
    chat = {"messages": [{"role": "system", "content": "You are terse. " * 5}, *MSG], "max_tokens": 2}
    post(server, CH, chat)
    u = post(server, CH, chat).json()["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] - 1
    assert httpx.post(server.url("/flush_cache"), timeout=10).status_code == 200
    assert post(server, G, body).json()["meta_info"]["cached_tokens"] == 0  # flushed before it ran
