"""Structured output through xgrammar (sglang_duet/constrained/grammar.py): the sampler masks a row to
what its grammar allows, the executor advances the matcher with each sampled token (also under
overlap scheduling), and the server takes SGLang's `json_schema` / `regex` / `ebnf` sampling params
and OpenAI's `response_format`, refusing a bad grammar with a 400 naming it.

On the tiny random smollm checkpoint (tests/tiny_models.py): its tokens are noise, so whatever it
writes inside the grammar is the grammar's doing.
"""
from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from hardening_utils import sse_events, wait_idle  # noqa: E402
from server_utils import ServerProcess  # noqa: E402
from tiny_models import EOS_ID  # noqa: E402

from sglang_duet.constrained.grammar import GrammarCompiler, GrammarError  # noqa: E402
from sglang_duet.sampling.sampler import Sampler, SamplingRow  # noqa: E402
from sglang_duet.sampling_params import SamplingParams, SamplingParamsError  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "n"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
REGEX = r"(cat|dog)-[0-9]{3}"
EBNF = 'root ::= ("yes" | "no") " " [0-9]'


def matches_schema(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"answer", "n"} and obj["answer"] in ("yes", "no")
            and isinstance(obj["n"], int) and 0 <= obj["n"] <= 9)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("smollm")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


# ---- sampler and matcher, in process --------------------------------------------------------


def test_sampler_masks_every_step_to_the_grammar(tokenizer):
    vocab = len(tokenizer)
    comp = GrammarCompiler(tokenizer, vocab)
    state = comp.new_state("regex", REGEX, {EOS_ID})
    free = SamplingRow(SamplingParams(temperature=0.0, logprobs=True), 0, [1], [])
    sampler = Sampler(vocab)
    gen = torch.Generator().manual_seed(0)
    out_ids: list[int] = []
    for _ in range(20):
        logits = torch.randn(2, vocab, generator=gen)
        row = SamplingRow(SamplingParams(temperature=1.0, logprobs=True, top_logprobs=3), 7, [1], list(out_ids),
                          eos_ids=[EOS_ID], grammar=state)
        got = sampler(logits, [row, free])
        tok = got.token_ids[0]
        # the unconstrained row is untouched (its argmax), the constrained one only sees allowed tokens
        assert got.token_ids[1] == int(logits[1].argmax())
        assert all(lp > float("-inf") for _, lp in got.logprobs[0]["top"][:1])
        state.accept(tok)
        out_ids.append(tok)
        if tok == EOS_ID:
            break
    assert out_ids[-1] == EOS_ID and state.terminated
    assert re.fullmatch(REGEX, tokenizer.decode(out_ids[:-1]))


def test_json_allows_any_whitespace_unless_disabled(tokenizer, tiny):
    """SGLang's default: any whitespace between JSON items; --constrained-json-disable-any-whitespace
    gives the compact form. Checked on the matcher and on what the engine hands each request."""
    spaced, compact = '{\n  "answer" :  "yes",\n\t"n": 3 }', '{"answer": "yes", "n": 3}'

    def accepts(comp, text):
        state = comp.new_state("json_schema", json.dumps(SCHEMA), {EOS_ID})
        return state.matcher.accept_string(text) and state.matcher.is_completed()

    default, disabled = GrammarCompiler(tokenizer, len(tokenizer)), GrammarCompiler(tokenizer, len(tokenizer),
                                                                                   any_whitespace=False)
    assert accepts(default, spaced) and accepts(default, compact)
    assert not accepts(disabled, spaced) and accepts(disabled, compact)
    from sglang_duet.engine import Engine

    for flag, want in ((False, True), (True, False)):
        eng = Engine(tiny, max_total_tokens=1024, constrained_json_disable_any_whitespace=flag)
        try:
            state = eng.core.core.grammar_factory(SamplingParams(json_schema=json.dumps(SCHEMA)), {EOS_ID})
            assert (state.matcher.accept_string(spaced) and state.matcher.is_completed()) == want
        finally:
            eng.shutdown()


# a structural tag that forces its tag at once (xgrammar's format, passed through as SGLang does)
FORCED_TAG = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>",
                                                   "content": {"type": "regex", "pattern": REGEX}}}
LEGACY_TAG = {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}],
              "triggers": ["<f>"]}


def test_structural_tags_compile_and_constrain(tokenizer):
    """SGLang's structural_tag: its original form (structures + triggers: free text, then after a
    trigger the tag's JSON) and xgrammar's format; malformed ones are named."""
    comp = GrammarCompiler(tokenizer, len(tokenizer))

    def accepts(tag, text):
        m = comp.new_state("structural_tag", json.dumps(tag), {EOS_ID}).matcher
        return m.accept_string(text)

    assert accepts(LEGACY_TAG, 'Some text <f>{"answer": "no", "n": 4}</f> and more')
    assert not accepts(LEGACY_TAG, 'Some text <f>{"answer": "maybe", "n": 4}')
    assert accepts(FORCED_TAG, "<f>cat-123</f>") and not accepts(FORCED_TAG, "text first")
    for bad, why in (("{", "not JSON"), ("[]", "must be an object"), ('{"triggers": ["<f>"]}', "structures"),
                     (json.dumps({**LEGACY_TAG, "triggers": []}), "triggers"),
                     (json.dumps({"structures": [{"begin": "<f>"}], "triggers": ["<f>"]}), "structures[0]"),
                     (json.dumps({"format": {"type": "nonsense"}}), "nonsense")):
        with pytest.raises(GrammarError, match=f"^structural_tag is not a valid grammar: .*{re.escape(why)}"):
            comp.compile("structural_tag", bad)
    with pytest.raises(SamplingParamsError, match="regex and structural_tag may not be set together"):
        SamplingParams.from_dict({"regex": "a", "structural_tag": json.dumps(FORCED_TAG)})


def test_bad_grammars_name_their_field(tokenizer):
    comp = GrammarCompiler(tokenizer, len(tokenizer))
    for kind, spec in (("json_schema", "{not json"), ("regex", "(ab"), ("ebnf", "root ::= undefined_rule")):
        with pytest.raises(GrammarError) as e:
            comp.compile(kind, spec)
        assert str(e.value).startswith(f"{kind} is not a valid grammar"), str(e.value)
    with pytest.raises(SamplingParamsError, match="json_schema and regex may not be set together"):
        SamplingParams.from_dict({"json_schema": "{}", "regex": "a"})
    with pytest.raises(SamplingParamsError, match="regex must be a non-empty string"):
        SamplingParams.from_dict({"regex": 3})


def test_engine_grammar_with_and_without_overlap(tiny):
    """lanes=1: the synchronous ModelExecutor; lanes=2 on a CPU: the two-lane executor with overlap
    scheduling (a decode planned before the previous token is known). Same tokens, valid outputs."""
    from sglang_duet.engine import Engine

    prompts = ["The capital of France", "Hello", "def add(a, b):"]
    results = {}
    for lanes in ("1", "2"):
        # compact JSON: a random model sampling at temperature 1 would fill max_new_tokens with the
        # whitespace the default allows before closing the object
        eng = Engine(tiny, lanes=lanes, max_total_tokens=4096, constrained_json_disable_any_whitespace=True)
        try:
            assert eng.core.core._overlap == (lanes == "2")
            got = []
            for sp in ({"json_schema": json.dumps(SCHEMA)}, {"regex": REGEX}, {"ebnf": EBNF},
                       {"structural_tag": json.dumps(FORCED_TAG)}):
                outs = eng.generate(prompts, {**sp, "temperature": 1.0, "seed": 11, "max_new_tokens": 48})
                got.append([o["output_ids"] for o in outs])
                for o in outs:
                    assert o["meta_info"]["finish_reason"]["type"] == "stop", o
                    text = o["text"]
                    if "json_schema" in sp:
                        assert matches_schema(json.loads(text)), text
                    elif "structural_tag" in sp:
                        assert re.fullmatch(f"<f>{REGEX}</f>", text), text
                    else:
                        assert re.fullmatch(REGEX if "regex" in sp else r"(yes|no) [0-9]", text), text
            with pytest.raises(SamplingParamsError, match="regex is not a valid grammar"):
                eng.generate("x", {"regex": "(ab"})
            core = eng.core.core
            for _ in range(100):  # an overlapped launch may still run for requests that finished
                if not core.inflight:
                    break
                eng.core.step(0.1)
            assert not core.requests and core.kv_free == core.allocator.capacity
            results[lanes] = got
        finally:
            eng.shutdown()
    assert results["1"] == results["2"]


# ---- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny):
    s = ServerProcess(["--model-path", tiny, "--max-total-tokens", "4096",
                       "--constrained-json-disable-any-whitespace"])  # see test_engine_grammar_with_and_without_overlap
    yield s
    assert s.stop() == 0, s.log_tail()


def post(server, path, body, timeout=120):
    return httpx.post(server.url(path), json=body, timeout=timeout)


def test_generate_with_sglang_grammar_params(server):
    for sp, check in (({"json_schema": json.dumps(SCHEMA)}, lambda t: matches_schema(json.loads(t))),
                      ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
                      ({"ebnf": EBNF}, lambda t: re.fullmatch(r"(yes|no) [0-9]", t))):
        r = post(server, "/generate", {"text": ["Hello", "The capital"],
                                       "sampling_params": {**sp, "temperature": 0.9, "seed": 5, "max_new_tokens": 48}})
        assert r.status_code == 200, r.text
        for o in r.json():
            assert o["meta_info"]["finish_reason"]["type"] == "stop" and check(o["text"]), o


def test_openai_response_format_stream_is_token_exact(server):
    body = {"messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 48,
            "temperature": 1.0, "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]
    text = msg["message"]["content"]
    assert matches_schema(json.loads(text)) and msg["finish_reason"] == "stop"
    with httpx.stream("POST", server.url("/v1/chat/completions"), json={**body, "stream": True}, timeout=120) as s:
        events = [e for e in sse_events(s.iter_lines()) if isinstance(e, dict) and e.get("choices")]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == text
    # token-exact on /generate (its stream carries the cumulative output_ids)
    gen = {"text": "Answer in JSON.", "sampling_params": {"json_schema": json.dumps(SCHEMA), "temperature": 1.0,
                                                          "seed": 9, "max_new_tokens": 48}}
    whole = post(server, "/generate", gen).json()
    with httpx.stream("POST", server.url("/generate"), json={**gen, "stream": True}, timeout=120) as s:
        last = [e for e in sse_events(s.iter_lines()) if isinstance(e, dict)][-1]
    assert last["output_ids"] == whole["output_ids"] and matches_schema(json.loads(whole["text"]))
    # response_format structural_tag (SGLang's): the whole object is the structural_tag param
    r = post(server, "/v1/chat/completions", {**body, "response_format": FORCED_TAG})
    assert r.status_code == 200, r.text
    assert re.fullmatch(f"<f>{REGEX}</f>", r.json()["choices"][0]["message"]["content"])
    # json_object on /v1/completions: any JSON object
    r = post(server, "/v1/completions", {"prompt": "JSON:", "max_tokens": 64, "temperature": 0,
                                         "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    else:  # ran out of tokens inside the object: still a prefix of one
        assert choice["text"].startswith("{")


@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"text": "hi", "sampling_params": {"json_schema": "{bad"}}, "json_schema"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": "(ab"}}, "regex"),
    ("/generate", {"text": "hi", "sampling_params": {"ebnf": "root ::= nope"}}, "ebnf"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/$defs/missing"}}}}}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "regex": "[a-"}, "regex"),
])
def test_bad_grammar_is_a_400_naming_it(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_abort_of_a_grammar_stream_leaves_the_kv_whole(server):
    body = {"text": "Hello", "stream": True,
            "sampling_params": {"regex": "[a-z]{400}", "max_new_tokens": 400, "temperature": 1.0, "seed": 1}}
    with httpx.stream("POST", server.url("/generate"), json=body, timeout=120) as s:
        for i, _ in enumerate(s.iter_lines()):
            if i >= 4:
                break  # hang up mid-stream
    st = wait_idle(server)
    assert st["kv_free_slots"] == st["kv_total_slots"]
    # the server still serves grammars after it
    r = post(server, "/generate", {"text": "hi", "sampling_params": {"regex": REGEX, "max_new_tokens": 16,
                                                                    "temperature": 0}})
    assert r.status_code == 200 and re.fullmatch(REGEX, r.json()["text"]), r.text


def test_core_hands_each_request_its_grammar_and_a_decode_instance_continues_it():
    """The core's hook: a grammar per request at admission (through ReqWork to executors), None for
    the others; a request admitted prefilled (PD decode instance) has its first token accepted."""
    from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
    from sglang_duet.policies.base import load_policy

    class Recorder:
        def __init__(self):
            self.accepted = []

        def accept(self, t):
            self.accepted.append(t)

    made = []

    def factory(params, stop_ids):
        if params.regex is None:
            return None
        made.append((Recorder(), set(stop_ids)))
        return made[-1][0]

    core = SchedulerCore(CoreConfig(kv_slots=256, context_length=128), load_policy("aggregated"))
    core.grammar_factory = factory
    core.add_request("g", [5, 6, 7], SamplingParams(regex="a+", stop_token_ids=[9]), eos_ids={2})
    core.add_request("plain", [5, 6], SamplingParams(), eos_ids={2})
    assert made[0][1] == {2, 9}  # the matcher's stop tokens are the request's own
    assert core.requests["g"].grammar is made[0][0] and core.requests["plain"].grammar is None
    (launch,) = core.schedule()  # the aggregated policy prefills both
    by_rid = {w.rid: w for w in launch.work}
    assert by_rid["g"].grammar is made[0][0] and by_rid["plain"].grammar is None
    core.admit_prefilled("d", [5, 6, 7], 42, SamplingParams(regex="a+"), kv_slots=core._alloc(3), eos_ids={2})
    assert core.requests["d"].grammar is made[1][0] and made[1][0].accepted == [42]
