"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (stream and not)."""
from __future__ import annotations

import os
import time

import orjson
from starlette.requests import Request

from sglang_duet.server import openai_protocol as proto
from sglang_duet.server.errors import APIError, json_response
from sglang_duet.server.sse import sse, start_stream
from sglang_duet.server.tokenizer_manager import MAX_SEQS_PER_REQUEST, TokenizerManager


class OpenAIServing:
    def __init__(self, tm: TokenizerManager, model_path: str | None):
        self.tm = tm
        self.model_path = model_path
        self.fmt = proto.LogprobFormatter(tm.tokenizer)
        name = tm.served_model_name
        # Clients may name the model by its served name, its path, or the path's last component.
        self.model_names = {name, os.path.basename(name.rstrip("/"))}
        for p in (model_path, tm.info.model_path, tm.info.model_name):
            if p:
                self.model_names |= {p, os.path.basename(p.rstrip("/"))}
        self.model_names.discard("")
        # A template that renders tool calls gets the tool-call history; others refuse it (400).
        self.template_renders_tools = "tool_calls" in (tm.chat_template or "")

    # ---- models ----------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.tm.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "sglang-duet", "root": self.model_path or self.tm.info.model_path,
                "max_model_len": self.tm.context_length}

    def list_models(self):
        return json_response({"object": "list", "data": [self.model_card()]})

    def retrieve_model(self, model_id: str):
        if model_id not in self.model_names:
            raise self._unknown_model(model_id)
        return json_response(self.model_card())

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return  # OpenAI requires it; SGLang serves one model and lets it be left out
        if not isinstance(model, str) or model not in self.model_names:
            raise self._unknown_model(model)

    @staticmethod
    def _unknown_model(model) -> APIError:
        return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # ---- /tokenize and /detokenize (SGLang's shapes) -----------------------------------------

    async def tokenize(self, body: dict):
        self.check_model(body)
        add_special = proto.get(body, "add_special_tokens", bool, True)
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            raise APIError(400, "Exactly one of 'prompt' or 'messages' must be provided.", param="prompt")
        if messages is not None:
            msgs = proto.chat_messages(body, self.tm.context_length, self.template_renders_tools)
            ids = await self.tm.apply_chat_template_async(msgs, proto.template_kwargs(body),
                                                          bool(proto.get(body, "continue_final_message", bool, False)))
            return json_response({"tokens": ids, "count": len(ids), "max_model_len": self.tm.context_length})
        single = isinstance(prompt, str)
        texts = [prompt] if single else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "prompt must be a string or a non-empty list of strings.", param="prompt")
        if self.tm.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", param="prompt")
        ids = await self.tm.inputs.tokenize_many_async(texts, "prompt", add_special_tokens=add_special)
        if single:
            return json_response({"tokens": ids[0], "count": len(ids[0]), "max_model_len": self.tm.context_length})
        return json_response({"tokens": ids, "count": [len(x) for x in ids], "max_model_len": self.tm.context_length})

    async def detokenize(self, body: dict):
        self.check_model(body)
        skip = proto.get(body, "skip_special_tokens", bool, True)
        tokens = body.get("tokens")
        if self.tm.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", param="tokens")
        single = isinstance(tokens, list) and all(not isinstance(t, list) for t in tokens)
        seqs = [tokens] if single else tokens
        if not isinstance(seqs, list) or not seqs:
            raise APIError(400, "tokens must be a list of token ids or a non-empty list of such lists.",
                           param="tokens")
        for seq in seqs:
            self.tm.check_ids(seq, "tokens")
        texts = await self.tm.inputs.decode_many_async(seqs, skip)
        return json_response({"text": texts[0] if single else texts})

    # ---- completions ------------------------------------------------------------------------

    async def completions(self, request: Request, body: dict):
        proto.check_fields(body, "completions")
        self.check_model(body)
        n = proto.get_n(body)
        stream = bool(proto.get(body, "stream", bool, False))
        usage_chunk = proto.include_usage(body)
        echo = bool(proto.get(body, "echo", bool, False))
        want_ids = bool(body.get("return_token_ids"))
        if body.get("suffix"):
            raise APIError(400, "suffix is not supported.", param="suffix")
        sd = proto.sampling_dict(body, default_max_tokens=16)  # OpenAI's default for completions
        sd = {**self.tm.sampling_defaults, **sd}  # the model's generation_config.json, where the request is silent
        lp = proto.get(body, "logprobs", int, None)
        if lp is not None:
            if not 0 <= lp <= 20:
                raise APIError(400, f"logprobs must be in [0, 20], got {lp}.", param="logprobs")
            sd.update(logprobs=True, top_logprobs=lp)
        prompts = proto.completion_prompts(body)
        if len(prompts) * n > MAX_SEQS_PER_REQUEST:  # before tokenizing them all
            raise APIError(400, f"One request may ask for at most {MAX_SEQS_PER_REQUEST} sequences "
                                f"(prompts x n), got {len(prompts) * n}.")
        base = self.tm.new_rid()
        rids = proto.request_ids(body, len(prompts) * n, f"cmpl-{base}")
        texts = [p for p in prompts if isinstance(p, str)]
        for p in prompts:
            if not isinstance(p, str):
                self.tm.check_ids(p, "prompt")  # before decoding them for echo
        tokenized = iter(await self.tm.tokenize_many_async(texts, "prompt") if texts else ())
        ids_list = [next(tokenized) if isinstance(p, str) else p for p in prompts]
        limit = proto.explicit_max_tokens(body)
        reqs, meta = [], []  # meta: the prompt text each choice echoes ("" without echo)
        for pi, ids in enumerate(ids_list):
            if limit is not None and ids:
                self.tm.check_fits(len(ids), *limit)
            prompt_text = ""
            if echo:
                prompt_text = prompts[pi] if isinstance(prompts[pi], str) else (
                    self.tm.tokenizer.decode(ids) if self.tm.tokenizer is not None else "")
            for d in proto.choice_seeds(sd, n):
                reqs.append((rids[len(reqs)], ids, self.tm.make_params(d)))
                meta.append(prompt_text)
        cid = f"cmpl-{base}"
        created = int(time.time())
        model = body.get("model") or self.tm.served_model_name
        await self.tm.check_grammars([p for _, _, p in reqs], proto.grammar_names(body))
        group = self.tm.submit(reqs, request)

        def choice(i, text, finish, logprobs):
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": proto.finish_reason(finish),
                    "matched_stop": proto.matched_stop(finish)}

        if not stream:
            try:
                res = await _collect(group)
            finally:
                group.close()
            choices, pt, ct = [], 0, 0
            for i, r in enumerate(res):
                lps = None
                if lp is not None:
                    lps, _ = self.fmt.completion(r["logprobs"], len(meta[i]))
                c = choice(i, meta[i] + r["text"], r["finish_reason"], lps)
                if want_ids:
                    c["token_ids"] = r["ids"]
                choices.append(c)
                ct += r["completion_tokens"]
            pt = sum(len(ids) for ids in ids_list)
            cached = sum(res[i]["cached_tokens"] for i in range(0, len(res), n))  # one choice per prompt
            return json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": choices, "usage": proto.usage(pt, ct, cached)})

        offsets = [len(m) for m in meta]
        counts = {}

        chunk = ChunkEncoder({"id": cid, "object": "text_completion", "created": created, "model": model},
                             usage_chunk)

        def render(batch):
            out = []
            for i, d in batch:
                counts[i] = (d.prompt_tokens, d.completion_tokens)
                lps = None
                if lp is not None:
                    lps, offsets[i] = self.fmt.completion(d.logprobs, offsets[i])
                text = d.text
                if meta[i]:  # echo: the prompt comes first, once
                    text, meta[i] = meta[i] + text, ""
                if text or lps and lps["tokens"] or d.finished:
                    out.append(chunk([choice(i, text, d.finish_reason if d.finished else None, lps)]))
            return out

        def tail():
            if usage_chunk:
                pt = sum(len(ids) for ids in ids_list)
                yield chunk([], proto.usage(pt, sum(c for _, c in counts.values())))

        return await start_stream(group, render, tail)

    # ---- chat -------------------------------------------------------------------------------

    async def chat(self, request: Request, body: dict):
        proto.check_fields(body, "chat")
        self.check_model(body)
        n = proto.get_n(body)
        stream = bool(proto.get(body, "stream", bool, False))
        usage_chunk = proto.include_usage(body)
        messages = proto.chat_messages(body, self.tm.context_length, self.template_renders_tools)
        sd = proto.sampling_dict(body, default_max_tokens=None)  # until eos / context end, like OpenAI
        sd = {**self.tm.sampling_defaults, **sd}
        want_lp = bool(proto.get(body, "logprobs", bool, False))
        top = proto.get(body, "top_logprobs", int, None)
        if top is not None and not want_lp:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        if want_lp:
            sd.update(logprobs=True, top_logprobs=top or 0)
        kwargs = proto.template_kwargs(body)
        if body.get("input_ids") is not None:  # SGLang: pre-tokenized prompt, the template is skipped
            ids = list(body["input_ids"])
            self.tm.check_ids(ids)
        else:
            ids = await self.tm.apply_chat_template_async(messages, kwargs, bool(body.get("continue_final_message")))
        limit = proto.explicit_max_tokens(body)
        if limit is not None:
            self.tm.check_fits(len(ids), *limit)
        base = self.tm.new_rid()
        rids = proto.request_ids(body, n, f"chatcmpl-{base}")
        reqs = [(rids[i], ids, self.tm.make_params(d)) for i, d in enumerate(proto.choice_seeds(sd, n))]
        await self.tm.check_grammars([p for _, _, p in reqs], proto.grammar_names(body))
        cid = f"chatcmpl-{base}"
        created = int(time.time())
        model = body.get("model") or self.tm.served_model_name
        group = self.tm.submit(reqs, request)

        if not stream:
            try:
                res = await _collect(group)
            finally:
                group.close()
            choices, ct = [], 0
            for i, r in enumerate(res):
                c = {
                    "index": i, "message": {"role": "assistant", "content": r["text"]},
                    "logprobs": {"content": self.fmt.chat(r["logprobs"])} if want_lp else None,
                    "finish_reason": proto.finish_reason(r["finish_reason"]),
                    "matched_stop": proto.matched_stop(r["finish_reason"]),
                }
                if body.get("return_token_ids"):
                    c["token_ids"] = r["ids"]
                if body.get("return_prompt_token_ids"):
                    c["prompt_token_ids"] = ids
                if body.get("return_meta_info"):
                    c["meta_info"] = {"id": rids[i], "finish_reason": r["finish_reason"], "prompt_tokens": len(ids),
                                      "completion_tokens": r["completion_tokens"],
                                      "cached_tokens": r["cached_tokens"]}
                choices.append(c)
                ct += r["completion_tokens"]
            return json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": choices, "usage": proto.usage(len(ids), ct, res[0]["cached_tokens"])})

        started = set()
        counts = {}
        cached = {}

        chunk = ChunkEncoder({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model},
                             usage_chunk)

        def render(batch):
            out = []
            for i, d in batch:
                counts[i] = d.completion_tokens
                if d.finished:
                    cached[i] = d.cached_tokens
                if i not in started:  # OpenAI's first chunk of a choice names the role
                    started.add(i)
                    out.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
                if d.text or (want_lp and d.logprobs):
                    out.append(chunk([{"index": i, "delta": {"content": d.text},
                                       "logprobs": {"content": self.fmt.chat(d.logprobs)} if want_lp else None,
                                       "finish_reason": None}]))
                if d.finished:
                    out.append(chunk([{"index": i, "delta": {}, "logprobs": None,
                                       "finish_reason": proto.finish_reason(d.finish_reason),
                                       "matched_stop": proto.matched_stop(d.finish_reason)}]))
            return out

        def tail():
            if usage_chunk:
                yield chunk([], proto.usage(len(ids), sum(counts.values()), cached.get(0, 0)))

        return await start_stream(group, render, tail)


class ChunkEncoder:
    """A stream's chunks: `sse({**head, "choices": choices[, "usage": usage]})`, byte for byte (usage
    only when the client asked for the usage chunk: null in every other chunk), with the head's
    fields (id, object, created, model: the same in every chunk) encoded once."""

    __slots__ = ("head", "open", "end", "with_usage")

    def __init__(self, head: dict, with_usage: bool):
        self.head = head
        self.open = b"data: " + orjson.dumps(head)[:-1] + b',"choices":'  # the head's JSON without its "}"
        self.end = b',"usage":null}\n\n' if with_usage else b"}\n\n"
        self.with_usage = with_usage

    def __call__(self, choices: list, usage: dict | None = None) -> bytes:
        if usage is None or not self.with_usage:
            return b"".join((self.open, orjson.dumps(choices), self.end))
        return sse({**self.head, "choices": choices, "usage": usage})


async def _collect(group) -> list[dict]:
    res = [{"text": [], "ids": [], "logprobs": [], "finish_reason": None, "prompt_tokens": 0,
            "completion_tokens": 0, "cached_tokens": 0} for _ in group.states]
    while (batch := await group.next()) is not None:
        for i, d in batch:
            r = res[i]
            r["text"].append(d.text)
            r["ids"].extend(d.ids)
            r["logprobs"].extend(d.logprobs)
            if d.finished:
                r.update(finish_reason=d.finish_reason, prompt_tokens=d.prompt_tokens,
                         completion_tokens=d.completion_tokens, cached_tokens=d.cached_tokens)
    for r in res:
        r["text"] = "".join(r["text"])
    return res


def loads_body(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"Malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


__all__ = ["OpenAIServing", "loads_body"]
