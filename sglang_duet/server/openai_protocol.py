"""OpenAI request parsing (JSON dict -> sampling-params dict) and response pieces.

Plain dicts in and out, not pydantic models: the field checks we need are few and every error must
name the offending `param`. Unknown top-level fields are rejected as OpenAI's API does (HTTP 400
"Unrecognized request argument supplied: X"): a misspelt or unimplemented parameter (`top-k`,
`guided_json`) would otherwise change nothing and go unnoticed. Accepted beyond OpenAI's own
fields: the SGLang/vLLM sampling extensions in `_COMMON_SAMPLING` (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...) and `chat_template_kwargs`
(see docs/reliability.md).
"""
from __future__ import annotations

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
                      "presence_penalty", "stop", "seed", "logit_bias", "user"}
_CHAT_FIELDS = {"model", "messages", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "frequency_penalty", "presence_penalty", "stop", "seed", "logit_bias",
                "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "user",
                "chat_template_kwargs",
                # accepted and ignored: they change nothing about the generated tokens
                "store", "metadata", "service_tier", "parallel_tool_calls", "modalities"}
# OpenAI fields we know but do not implement: a non-null value is a 400 naming the field.
_CHAT_UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort")


def check_fields(body: dict, route: str) -> None:
    """400 for top-level fields this route does not know (OpenAI's wording) or does not implement."""
    allowed = (_CHAT_FIELDS if route == "chat" else _COMPLETION_FIELDS) | _COMMON_SAMPLING.keys()
    unknown = [k for k in body if k not in allowed and (route != "chat" or k not in _CHAT_UNSUPPORTED)]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise APIError(400, f"Unrecognized request argument{plural} supplied: {', '.join(map(str, unknown))}",
                       param=str(unknown[0]))
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
    for k in ("user",):
        if body.get(k) is not None and not isinstance(body[k], str):
            raise APIError(400, f"{k} must be a string.", param=k)


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
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise APIError(400, f"{param} must be a non-negative integer, got {max_tokens!r}.", param=param)
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


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list.", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role.", param="messages")
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
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    if body.get("tools"):
        raise APIError(400, "tools are not supported.", param="tools")
    rf = body.get("response_format")
    if rf and (not isinstance(rf, dict) or rf.get("type") not in (None, "text")):
        raise APIError(400, "response_format other than text is not supported.", param="response_format")
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
