"""Multi-turn chat with and without the radix prefix cache: prefill tokens computed and TTFT.

Offline Engine (no HTTP), greedy, the embedded SmolLM2-135M-Instruct on the CPU by default. Each
conversation has a shared system prompt; every turn sends the whole history again (as chat clients
do), so with the cache only the new user message (and the last reply) is prefilled.

    python -m benchmark.prefix_cache [--conversations 2] [--turns 4] [--new-tokens 16]
"""
from __future__ import annotations

import argparse
import json
import time

SYSTEM = ("You are a careful assistant for a team of engineers. Answer in short sentences, cite the "
          "relevant part of the question, say when you are unsure, and never invent facts. ") * 4
QUESTIONS = ["What does a KV cache store?", "Why does prefill cost more than decode?",
             "What is chunked prefill?", "How does a radix tree share prefixes?", "What is TTFT?",
             "Name one way to reduce TBT."]


def run(cache: bool, conversations: int, turns: int, new_tokens: int, model_path: str | None) -> dict:
    from sglang_duet import Engine
    from sglang_duet.sampling_params import SamplingParams

    engine = Engine(model_path=model_path, disable_radix_cache=not cache)
    tok, core = engine.tokenizer, engine.core
    computed = {"tokens": 0}
    submit = core.executor.submit

    def counting_submit(launch):
        computed["tokens"] += sum(len(w.input_ids) for w in launch.work)
        return submit(launch)

    core.executor.submit = counting_submit
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    ttfts, prompt_tokens, cached, outputs = [], 0, 0, []
    for c in range(conversations):
        history = [{"role": "system", "content": SYSTEM}]
        for t in range(turns):
            history.append({"role": "user", "content": f"({c}) {QUESTIONS[(c + t) % len(QUESTIONS)]}"})
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
            rid = f"c{c}t{t}"
            t0 = time.perf_counter()
            core.add_request(rid, ids, params)
            out, first = [], None
            while True:
                ups = core.step()
                for u in ups:
                    if u.new_token_ids and first is None:
                        first = time.perf_counter() - t0
                    out.extend(u.new_token_ids)
                    if u.finished:
                        cached += u.cached_tokens
                if any(u.finished for u in ups):
                    break
            ttfts.append(first)
            prompt_tokens += len(ids)
            outputs.append(out)
            history.append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=True)})
    engine.shutdown()
    decode_tokens = sum(len(o) for o in outputs) - len(outputs)  # each output's first token comes from prefill
    return {"cache": cache, "requests": len(ttfts), "prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "prefill_tokens_computed": computed["tokens"] - decode_tokens,
            "ttft_mean_ms": 1e3 * sum(ttfts) / len(ttfts), "ttft_later_turns_mean_ms":
                1e3 * sum(x for i, x in enumerate(ttfts) if i % turns) / max(1, len(ttfts) - conversations),
            "outputs": outputs}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=2)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--model-path", default=None)
    a = p.parse_args(argv)
    rows = [run(cache, a.conversations, a.turns, a.new_tokens, a.model_path) for cache in (False, True)]
    same = rows[0]["outputs"] == rows[1]["outputs"]
    for r in rows:
        r.pop("outputs")
        print(json.dumps(r))
    print(json.dumps({"token_exact": same,
                      "prefill_saved": 1 - rows[1]["prefill_tokens_computed"] / rows[0]["prefill_tokens_computed"],
                      "ttft_speedup_later_turns": rows[0]["ttft_later_turns_mean_ms"]
                      / rows[1]["ttft_later_turns_mean_ms"]}))


if __name__ == "__main__":
    main()
