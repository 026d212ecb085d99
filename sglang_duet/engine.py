"""The offline engine: `Engine(...).generate(prompts, sampling_params)`, SGLang's offline API."""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import fields

from sglang_duet.constrained.grammar import install_grammars
from sglang_duet.core.scheduler_core import RequestUpdate
from sglang_duet.engine_core import EngineCore
from sglang_duet.sampling_params import SamplingParams
from sglang_duet.server_args import ServerArgs


def output_text(tokenizer, output_ids: list[int], finish_reason: dict | None, params: SamplingParams) -> str:
    """The text a client sees: stop token / stop string trimmed unless no_stop_trim."""
    if tokenizer is None:
        return ""
    ids = output_ids
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, int) and not params.no_stop_trim and ids and ids[-1] == matched:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens,
                            spaces_between_special_tokens=params.spaces_between_special_tokens)
    if isinstance(matched, str) and not params.no_stop_trim:
        i = text.find(matched)
        if i >= 0:
            text = text[:i]
    return text


class Engine:
    """Runs the scheduler core in this process. Extra keyword arguments are ServerArgs fields."""

    def __init__(self, model_path: str | None = None, policy: str = "aggregated", **kwargs):
        names = {f.name for f in fields(ServerArgs)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"Engine() got unknown argument(s): {', '.join(unknown)}")
        self.server_args = ServerArgs(model_path=model_path, policy=policy, **kwargs)
        self.core = EngineCore(self.server_args)
        install_grammars(self.core)  # structured output (json_schema / regex / ebnf sampling params)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict | list[dict]:
        """Generate for one prompt (returns a dict) or a batch (returns a list), all admitted at once."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("Give exactly one of prompt or input_ids.")
        single = isinstance(prompt, str) or (input_ids is not None and (not input_ids or isinstance(input_ids[0], int)))
        if prompt is not None:
            prompts = [prompt] if single else list(prompt)
            if self.tokenizer is None:
                raise ValueError("This model has no tokenizer; pass input_ids.")
            ids_list = [self.tokenizer.encode(p) for p in prompts]
        else:
            ids_list = [list(input_ids)] if single else [list(x) for x in input_ids]
        n = len(ids_list)
        if isinstance(sampling_params, list):
            if len(sampling_params) != n:
                raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts")
            plist = sampling_params
        else:
            plist = [sampling_params] * n
        params = [p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p) for p in plist]
        rids = [f"offline-{next(self._ids)}-{uuid.uuid4().hex[:8]}" for _ in range(n)]
        for rid, ids, p in zip(rids, ids_list, params):
            self.core.add_request(rid, ids, p)
        results = self.run_until_done(set(rids))
        outs = [self._format(results[rid], p) for rid, p in zip(rids, params)]
        return outs[0] if single else outs

    def run_until_done(self, rids: set[str]) -> dict[str, dict]:
        """Step the core until these requests finish; other requests progress alongside."""
        acc = {rid: {"output_ids": [], "logprobs": [], "update": None} for rid in rids}
        pending = set(rids)
        while pending:
            for u in self.core.step():
                self._collect(acc, pending, u)
        return acc

    @staticmethod
    def _collect(acc: dict, pending: set, u: RequestUpdate) -> None:
        a = acc.get(u.rid)
        if a is None:
            return
        a["output_ids"].extend(u.new_token_ids)
        a["logprobs"].extend(u.new_logprobs)
        if u.finished:
            a["update"] = u
            pending.discard(u.rid)

    def _format(self, a: dict, params: SamplingParams) -> dict:
        u: RequestUpdate = a["update"]
        now = time.monotonic()
        meta = {
            "id": u.rid,
            "finish_reason": u.finish_reason,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens,
            "e2e_latency": (u.finish_time or now) - u.arrival_time,
            "ttft": (u.first_token_time - u.arrival_time) if u.first_token_time is not None else None,
        }
        if params.logprobs:
            meta["output_token_logprobs"] = a["logprobs"]
        return {"text": output_text(self.tokenizer, a["output_ids"], u.finish_reason, params),
                "output_ids": a["output_ids"], "meta_info": meta}

    def shutdown(self) -> None:
        self.core.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
