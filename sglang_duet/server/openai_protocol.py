"""OpenAI request parsing (JSON dict -> sampling-params dict) and response pieces.

Plain dicts in and out, not pydantic models: the field checks we need are few and every error must
name the offending `param`. Unknown top-level fields are rejected as OpenAI's API does (HTTP 400
"Unrecognized request argument supplied: X"): a misspelt or unimplemented parameter (`top-k`,
`guided_json`) would otherwise change nothing and go unnoticed. Accepted beyond OpenAI's own
fields: the SGLang/vLLM sampling extensions in `_COMMON_SAMPLING` (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...), `chat_template_kwargs`, and
SGLang's own request fields (`_SGLANG_FIELDS`: ignored, honoured, or refused unless null/false,
as listed there; see docs/reliability.md).
"""
from __future__ import annotations

import json

from sglang_duet.constrained.grammar import JSON_OBJECT_SCHEMA
from sglang_duet.server.errors import APIError

_MISSING = object()

# OpenAI / SGLang request field -> SamplingParams field
_COMMON_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim", "min_tokens": "min_new_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
}


# OpenAI fields we implement, per route (the _COMMON_SAMPLING extensions are added below).
_COMPLETION_FIELDS = {"model", "prompt", "n", "best_of", "stream", "stream_options", "echo", "suffix", "logprobs",
                      "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
                      "presence_penalty", "stop", "seed", "logit_bias", "user", "response_format"}
_CHAT_FIELDS = {"model", "messages", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "frequency_penalty", "presence_penalty", "stop", "seed", "logit_bias",
                "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "user",
                "chat_template_kwargs",
                # accepted and ignored: they change nothing about the generated tokens
                "store", "metadata", "service_tier", "parallel_tool_calls", "modalities"}
# OpenAI fields we know but do not implement: a non-null value is a 400 naming the field.
_CHAT_UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options")

# SGLang's own request fields (sglang/srt/entrypoints/openai/protocol.py; sglang-router forwards
# them), as SGLang types them. A value of the wrong type is a 400 either way.
_STR_OR_LIST = (str, list)
_INT_OR_LIST = (int, list)
# Accepted and ignored, as SGLang ignores them on a single server without the feature they steer
# (disaggregation bootstrap, data-parallel routing, cache salts, priorities, reasoning display
# without a --reasoning-parser, multimodal knobs): none changes the tokens generated here.
_SGLANG_IGNORED_COMMON = {
    "bootstrap_host": _STR_OR_LIST, "bootstrap_port": _INT_OR_LIST, "bootstrap_room": _INT_OR_LIST,
    "routed_dp_rank": int, "disagg_prefill_dp_rank": int, "data_parallel_rank": int, "extra_key": _STR_OR_LIST,
    "cache_salt": _STR_OR_LIST, "ngram_corpus_id": _STR_OR_LIST, "priority": int, "custom_labels": dict,
    "return_cached_tokens_details": bool, "images_config": dict, "routed_experts_start_len": int,
}
_SGLANG_IGNORED_CHAT = {"separate_reasoning": bool, "stream_reasoning": bool, "max_dynamic_patch": int,
                        "min_dynamic_patch": int, "use_audio_in_video": bool, "task": str}
# Honoured (see openai_api.py).
_SGLANG_HONOURED_COMMON = {"rid": _STR_OR_LIST, "return_token_ids": bool,
                           # structured output, as on /generate (sampling params of the same names)
                           "regex": str, "ebnf": str, "json_schema": str}
_SGLANG_HONOURED_CHAT = {"continue_final_message": bool, "input_ids": list, "return_prompt_token_ids": bool,
                         "return_meta_info": bool, "reasoning_effort": (str, int, float)}
# Features this server does not have: null/false is accepted (sglang-router sends the defaults),
# anything else is a 400 naming the field.
_SGLANG_UNSUPPORTED = {"return_hidden_states": (bool, str), "return_routed_experts": bool, "lora_path": None,
                       "session_id": None, "session_params": None, "custom_logit_processor": None,
                       "custom_params": None, "stop_regex": None}
_SGLANG_FIELDS = {
    "completions": {**_SGLANG_IGNORED_COMMON, **_SGLANG_HONOURED_COMMON, **_SGLANG_UNSUPPORTED},
    "chat": {**_SGLANG_IGNORED_COMMON, **_SGLANG_IGNORED_CHAT, **_SGLANG_HONOURED_COMMON, **_SGLANG_HONOURED_CHAT,
             **_SGLANG_UNSUPPORTED},
}
_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# Every top-level field a route accepts (the unsupported chat ones are named by their own error)
_ALLOWED = {
    "completions": frozenset(_COMPLETION_FIELDS | _COMMON_SAMPLING.keys() | _SGLANG_FIELDS["completions"].keys()),
    "chat": frozenset(_CHAT_FIELDS | _COMMON_SAMPLING.keys() | _SGLANG_FIELDS["chat"].keys()
                      | set(_CHAT_UNSUPPORTED)),
}
_SGLANG_ORDER = {route: {k: i for i, k in enumerate(fields)} for route, fields in _SGLANG_FIELDS.items()}


def check_fields(body: dict, route: str) -> None:
    """400 for top-level fields this route does not know (OpenAI's wording) or does not implement."""
    sglang = _SGLANG_FIELDS[route]
    allowed = _ALLOWED[route]
    unknown = [k for k in body if k not in allowed]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise APIError(400, f"Unrecognized request argument{plural} supplied: {', '.join(map(str, unknown))}",
                       param=str(unknown[0]))
    # SGLang's fields the body holds, checked in _SGLANG_FIELDS' order (the first bad one is named)
    # without going through all 27-38 of them for each request
    present = [k for k in body if k in sglang]
    if len(present) > 1:
        order = _SGLANG_ORDER[route]
        present.sort(key=order.__getitem__)
    for k in present:
        kinds = sglang[k]
        v = body[k]
        if v is None:
            continue
        if kinds is not None:
            get(body, k, kinds)
        if k in _SGLANG_UNSUPPORTED and v is not False:
            raise APIError(400, f"{k} is not supported by this server.", param=k)
    if route == "chat":
        for k in _CHAT_UNSUPPORTED:
            if body.get(k) is not None:
                raise APIError(400, f"{k} is not supported.", param=k)
        tc = body.get("tool_choice")
        if tc not in (None, "none", "auto"):
            raise APIError(400, "tool_choice must be \"none\" or \"auto\": tools are not supported.",
                           param="tool_choice")
        mod = body.get("modalities")
        if mod is not None and mod != ["text"]:
            raise APIError(400, "modalities must be [\"text\"]: only text output is supported.", param="modalities")
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise APIError(400, f"tools must be a list, got {tools!r}.", param="tools")
            if tools:
                raise APIError(400, "tools are not supported.", param="tools")
        effort = body.get("reasoning_effort")
        if effort is not None and not (effort in _REASONING_EFFORTS or (
                not isinstance(effort, (bool, str)) and 0.0 <= effort <= 0.99)):
            raise APIError(400, f"reasoning_effort must be one of {', '.join(_REASONING_EFFORTS)} or a number in "
                                f"[0, 0.99], got {effort!r}.", param="reasoning_effort")
    check_response_format(body.get("response_format", _MISSING))
    for k in ("user",):
        if body.get(k) is not None and not isinstance(body[k], str):
            raise APIError(400, f"{k} must be a string.", param=k)


def check_response_format(rf) -> str | None:
    """null / absent / {"type": "text"} -> None; json_object / json_schema -> the JSON schema (a string)
    the output must match (json_object: any JSON object, as SGLang sends it to its grammar backend);
    structural_tag -> the whole object as JSON (the structural_tag sampling param, as SGLang)."""
    if rf is _MISSING or rf is None:
        return None
    if not isinstance(rf, dict):
        raise APIError(400, f"response_format must be an object with a type, got {rf!r}.", param="response_format")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        return JSON_OBJECT_SCHEMA
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise APIError(400, "response_format.json_schema must be an object with a schema, got "
                                f"{js!r}.", param="response_format")
        schema = js.get("schema", js.get("schema_"))  # SGLang's pydantic alias
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object, got "
                                f"{schema!r}.", param="response_format")
        return json.dumps(schema)
    if t == "structural_tag":  # SGLang: the whole object goes to the grammar backend as JSON
        return json.dumps(rf)
    raise APIError(400, f"response_format.type must be \"text\", \"json_object\", \"json_schema\" or "
                        f"\"structural_tag\", got {t!r}.", param="response_format")


def response_format_kind(rf) -> str:
    """The SamplingParams grammar field a (valid, not text) response_format sets."""
    return "structural_tag" if isinstance(rf, dict) and rf.get("type") == "structural_tag" else "json_schema"


def grammar_names(body: dict) -> dict[str, str]:
    """SamplingParams grammar field -> the request field that set it (for error messages)."""
    kind = response_format_kind(body.get("response_format"))
    return {kind: "response_format"} if body.get("response_format") is not None and \
        body.get(kind) is None else {}


def template_kwargs(body: dict) -> dict | None:
    """chat_template_kwargs, with reasoning_effort folded in as SGLang does ("none" turns thinking off)."""
    kw = body.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, dict):
        raise APIError(400, "chat_template_kwargs must be an object.", param="chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        kw = dict(kw or {})
        kw.setdefault("thinking", effort != "none")
        kw.setdefault("enable_thinking", effort != "none")
    return kw


def request_ids(body: dict, count: int, prefix: str) -> list[str]:
    """SGLang's `rid`: one string (suffixed per sequence when there are several) or one per sequence."""
    rid = body.get("rid")
    if rid is None:
        return [f"{prefix}-{i}" for i in range(count)]
    if isinstance(rid, str):
        if not rid:
            raise APIError(400, "rid must be a non-empty string.", param="rid")
        return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]
    if len(rid) != count or not all(isinstance(r, str) and r for r in rid):
        raise APIError(400, f"rid must be a string or a list of {count} non-empty strings (one per sequence).",
                       param="rid")
    return list(rid)


def explicit_max_tokens(body: dict) -> tuple[int, str] | None:
    """(value, field name) when the client set a token limit itself (defaults are clamped, not errors)."""
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is not None:
            return v, name
    return None


def get(body: dict, name: str, kinds, default=None, *, allow_none: bool = True):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    v = body.get(name, _MISSING)
    if v is _MISSING or (v is None and allow_none):
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise APIError(400, f"{name} must be of type {_kind_names(kinds)}, got {v!r}.", param=name)
    if not isinstance(v, kinds):
        raise APIError(400, f"{name} must be of type {_kind_names(kinds)}, got {v!r}.", param=name)
    return v


def _kind_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(k.__name__ for k in kinds)


def sampling_dict(body: dict, *, default_max_tokens: int | None) -> dict:
    """The SamplingParams fields of an OpenAI request (value ranges are SamplingParams' job)."""
    d: dict = {}
    for src, dst in _COMMON_SAMPLING.items():
        if body.get(src) is not None:
            d[dst] = body[src]
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        # OpenAI's and SGLang's rule: at least one token (0 would still run a prefill and bill it)
        raise APIError(400, f"{param} must be a positive integer, got {max_tokens!r}.", param=param)
    d["max_new_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "stop must be a string or a list of strings.", param="stop")
        d["stop"] = [s for s in stop if s]  # OpenAI ignores empty stop strings
    if body.get("seed") is not None:
        d["seed"] = body["seed"]
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported.", param="logit_bias")
    for k in ("regex", "ebnf", "json_schema"):
        if body.get(k) is not None:
            d[k] = body[k]
    spec = check_response_format(body.get("response_format", _MISSING))
    if spec is not None:
        kind = response_format_kind(body["response_format"])
        if d.get(kind) is not None:
            raise APIError(400, f"Give response_format or {kind}, not both.", param="response_format")
        d[kind] = spec
    return d


def get_n(body: dict) -> int:
    n = get(body, "n", int, 1)
    if not 1 <= n <= 128:
        raise APIError(400, f"n must be in [1, 128], got {n}.", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of is not supported (it must equal n).", param="best_of")
    return n


def include_usage(body: dict) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object.", param="stream_options")
    if not body.get("stream"):
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    return bool(so.get("include_usage"))


def choice_seeds(params: dict, n: int) -> list[dict]:
    """n copies of a sampling dict; with a seed, choice i gets seed + i (reproducible yet different)."""
    out = []
    for i in range(n):
        p = dict(params)
        if p.get("seed") is not None and isinstance(p["seed"], int) and i:
            p["seed"] = p["seed"] + i
        out.append(p)
    return out


def completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of those lists."""
    p = body.get("prompt", _MISSING)
    if p is _MISSING or p is None:
        raise APIError(400, "prompt is required.", param="prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in p):
            return [list(x) for x in p]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, "
                        "or a list of token-id lists.", param="prompt")


# SGLang's roles (matched case-insensitively, then lower-cased, as SGLang does).
CHAT_ROLES = ("system", "user", "assistant", "tool", "function", "developer", "latest_reminder")
MAX_NAME_CHARS = 256


def chat_messages(body: dict, max_messages: int, template_renders_tools: bool = False) -> list[dict]:
    """The request's messages as the chat template gets them (text parts joined), checked.

    At most `max_messages` (the caller passes the context length: every message a template renders
    costs at least one token), counted before anything else is looked at. Tool-call history
    (assistant `tool_calls`, `tool` messages) only goes to a template that renders it: dropping it
    silently would change the conversation the model sees.
    """
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list.", param="messages")
    if len(msgs) > max_messages:
        raise APIError(400, f"messages holds {len(msgs)} messages, more than fit in the model's context "
                            f"({max_messages} tokens).", param="messages", code="context_length_exceeded")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role.", param="messages")
        role = m["role"].lower()
        if role not in CHAT_ROLES:
            shown = m["role"] if len(m["role"]) <= 40 else m["role"][:40] + "..."
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {shown!r}.",
                           param="messages")
        name = m.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
            raise APIError(400, f"messages[{i}].name must be a string of at most {MAX_NAME_CHARS} characters.",
                           param="messages")
        if not template_renders_tools and (m.get("tool_calls") or role in ("tool", "function")):
            raise APIError(400, f"messages[{i}]: this model's chat template does not render tool calls or tool "
                                f"results (tools are not supported).", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported.", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts.",
                           param="messages")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "role": role, "content": content})
    return out


def finish_reason(fr: dict | None) -> str | None:
    if fr is None:
        return None
    t = fr.get("type")
    return t if t in ("stop", "length") else "abort"


def matched_stop(fr: dict | None):
    return fr.get("matched") if fr and fr.get("type") == "stop" else None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


class LogprobFormatter:
    """Token strings for logprobs (decoded one id at a time, cached: ids repeat a lot)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, tid: int) -> str:
        s = self._cache.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid]) if self.tokenizer is not None else ""
            if len(self._cache) < 100_000:
                self._cache[tid] = s
        return s

    def chat(self, lps) -> list[dict]:
        out = []
        for lp in lps:
            t = self.token(lp.token_id)
            out.append({"token": t, "logprob": lp.logprob, "bytes": list(t.encode("utf-8")),
                        "top_logprobs": [{"token": (s := self.token(i)), "logprob": v, "bytes": list(s.encode())}
                                         for i, v in lp.top]})
        return out

    def completion(self, lps, text_offset: int) -> tuple[dict, int]:
        """OpenAI legacy logprobs for some tokens; returns it and the text offset after them."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            t = self.token(lp.token_id)
            tokens.append(t)
            token_lps.append(lp.logprob)
            tops.append({self.token(i): v for i, v in lp.top})
            offsets.append(text_offset)
            text_offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}, text_offset
