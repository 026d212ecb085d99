"""What the serving path (HTTP + ZMQ IPC + detokenizer + SSE) adds per streamed token.

The server runs a 1-layer, hidden-64, vocab-512 Llama with dummy weights
(configs/models/tiny-overhead.json), so a forward pass costs next to nothing and what the client
measures is mostly the serving path. A 512-token byte-level BPE tokenizer is trained on the fly
(from local Python sources, nothing downloaded) so the detokenizer does real work; random ids from
dummy weights decode to arbitrary bytes, incomplete UTF-8 included.

For each concurrency, N clients (aiohttp) stream /generate (input_ids, ignore_eos,
max_new_tokens) at once; we report streamed tokens/s and the p50/p99 inter-token latency seen by
the clients, next to the same batch stepped by EngineCore in-process (no server): the gap between
the two is the serving overhead.

    python benchmark/server_overhead.py [--concurrency 1,64,256] [--output-len 128]
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmark.host_overhead import machine  # noqa: E402
from benchmark.server_process import ServerProcess  # noqa: E402

TINY_CONFIG = os.path.join(REPO, "configs", "models", "tiny-overhead.json")
VOCAB = 512


def build_tokenizer(out_dir: str) -> str:
    """A byte-level BPE with 512 tokens, trained on local stdlib sources; saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return out_dir


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---- client ---------------------------------------------------------------------------------------


async def stream_one(session, url: str, ids: list[int], n: int, gaps: list[float]) -> int:
    import orjson

    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
    got, last = 0, None
    async with session.post(url, json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            k = len(orjson.loads(line[6:])["output_ids"]) - got  # output_ids are cumulative
            if k <= 0:
                continue
            if last is not None:
                gaps.extend([(now - last) / k] * k)  # k tokens in one event share the gap
            got += k
            last = now
    return got


async def run_clients(base_url: str, concurrency: int, output_len: int, prompt_len: int, seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    gaps: list[float] = []
    conn = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        prompts = [[rng.randrange(3, VOCAB) for _ in range(prompt_len)] for _ in range(concurrency)]
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(stream_one(s, f"{base_url}/generate", p, output_len, gaps) for p in prompts))
        wall = time.perf_counter() - t0
    total = sum(counts)
    assert total == concurrency * output_len, (total, concurrency * output_len)
    return {"tokens": total, "wall_s": wall, "tok_s": total / wall, "itl_p50_ms": pct(gaps, 0.5) * 1e3,
            "itl_p99_ms": pct(gaps, 0.99) * 1e3}


# ---- engine-only baseline ---------------------------------------------------------------------


def engine_baseline(tok_dir: str | None, concurrency: int, output_len: int, prompt_len: int, seed: int) -> dict:
    """The same batch stepped by EngineCore in this process: model + scheduler, no serving path."""
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.sampling_params import SamplingParams
    from sglang_duet.server_args import ServerArgs

    core = EngineCore(ServerArgs(model_path=tok_dir, load_format="dummy", model_config=TINY_CONFIG))
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    for i in range(concurrency):
        core.add_request(f"r{i}", [rng.randrange(3, VOCAB) for _ in range(prompt_len)], params)
    total, steps, decode_steps = 0, [], []
    t0 = time.perf_counter()
    while core.has_work():
        ts = time.perf_counter()
        n = sum(len(u.new_token_ids) for u in core.step())
        dt = time.perf_counter() - ts
        total += n
        steps.append(dt)
        if n == concurrency:
            decode_steps.append(dt)
    wall = time.perf_counter() - t0
    core.shutdown()
    return {"tok_s": total / wall, "step_p50_ms": pct(decode_steps, 0.5) * 1e3,
            "step_p99_ms": pct(decode_steps, 0.99) * 1e3}


# ---- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--min-total-tokens", type=int, default=2048,
                    help="longer outputs at low concurrency, so every level runs long enough to measure")
    ap.add_argument("--no-tokenizer", action="store_true", help="ids only: the detokenizer passes text through")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmark", "results", "server_overhead-cpu2.md"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]

    def out_len(c: int) -> int:
        return max(a.output_len, -(-a.min_total_tokens // c))

    # One torch thread: the model is tiny and the 2 cores are shared by client, server and scheduler.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    work = tempfile.mkdtemp(prefix="server-overhead-")
    tok_dir = None if a.no_tokenizer else build_tokenizer(os.path.join(work, "tok"))
    flags = ["--load-format", "dummy", "--model-config", TINY_CONFIG, "--log-level", "warning",
             "--max-running-requests", str(max(levels))]
    if tok_dir:
        flags += ["--model-path", tok_dir]
    rows = []
    with ServerProcess(flags, os.path.join(work, "server.log")).start() as srv:
        asyncio.run(run_clients(srv.base_url, 8, 16, a.prompt_len, a.seed))  # warm-up
        for c in levels:
            r = asyncio.run(run_clients(srv.base_url, c, out_len(c), a.prompt_len, a.seed + c))
            rows.append((c, r))
            print(f"c={c}: {r}", flush=True)
    base = {c: engine_baseline(tok_dir, c, out_len(c), a.prompt_len, a.seed + c) for c in levels}

    lines = [
        "# Serving-path overhead (HTTP + IPC + detokenizer + SSE)",
        "",
        f"Machine: {machine()}; client, main process, scheduler and detokenizer share the cores "
        "(OMP_NUM_THREADS=1).",
        f"Model: dummy weights, `configs/models/tiny-overhead.json` (1 layer, hidden 64, vocab 512); "
        f"{'no tokenizer (ids only)' if a.no_tokenizer else 'a 512-token byte-level BPE, so detokenization is real'}.",
        f"Workload: N concurrent `/generate` streams, {a.prompt_len} prompt tokens, max({a.output_len}, "
        f"{a.min_total_tokens}/N) output tokens each (ignore_eos), aiohttp client. ITL = gap between SSE events / "
        "tokens in the event, seen by the client.",
        "Engine-only: the same batch stepped by `EngineCore` in one process (no HTTP/IPC); its step time is "
        "the floor the server's ITL is compared with.",
        "",
        "| streams | tokens/stream | server tok/s | ITL p50 (ms) | ITL p99 (ms) | engine-only tok/s "
        "| engine step p50 (ms) | engine step p99 (ms) | added per token p50 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in rows:
        b = base[c]
        lines.append(f"| {c} | {out_len(c)} | {r['tok_s']:.0f} | {r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} "
                     f"| {b['tok_s']:.0f} | {b['step_p50_ms']:.2f} | {b['step_p99_ms']:.2f} | {r['itl_p50_ms'] - b['step_p50_ms']:.2f} |")
    flags = f"--concurrency {a.concurrency} --output-len {a.output_len} --min-total-tokens {a.min_total_tokens}"
    lines += ["", f"Command: `python benchmark/server_overhead.py {flags}{' --no-tokenizer' if a.no_tokenizer else ''}`",
              ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
