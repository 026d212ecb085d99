"""One request's decode on a CPU next to the weight-read floor (issue 18, results in
benchmark/results/cpu_decode-cpu2.md).

    python -m benchmark.cpu_decode [--model-path P] [--threads 1] [--tokens 64] [--enable-torch-compile]

Prints, in CPU milliseconds of this process (medians; the wall clock of a shared machine says little):
  * the floor: one streaming pass over the weight bytes (`sum`), and every weight matrix times a vector
    as the model stores it ([out, in], `F.linear`) and as [in, out] copies (`x @ w_t`);
  * the engine: one request (128-token prompt) through the offline Engine with the CPU's default chunked
    policy, CPU ms per decoded token (a long generation minus a 2-token one), and its first 16 tokens.
Threads default to 1: what the server's model process gets on a 2-core machine (server/cpu_threads.py).
"""
from __future__ import annotations

import argparse
import os
import random
import time


def _median_cpu_ms(fn, reps: int = 15, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return sorted(out)[reps // 2] * 1e3


def floor_ms(model) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    # the model's own one-row copies (`..._weight_t`) are the same bytes transposed: left out
    mats = [t for name, t in model.serving_tensors().items() if t.dim() == 2 and not name.endswith("_weight_t")]
    xs = {t.shape[1]: torch.randn(1, t.shape[1]) for t in mats}
    copies = [t.t().contiguous() for t in mats]
    flat = torch.cat([t.reshape(-1) for t in mats])
    with torch.inference_mode():
        return {"MB": flat.numel() * flat.element_size() / 1e6,
                "sum over the bytes": _median_cpu_ms(lambda: flat.sum()),
                "F.linear, [out, in]": _median_cpu_ms(lambda: [F.linear(xs[t.shape[1]], t) for t in mats]),
                "x @ w_t, [in, out]": _median_cpu_ms(lambda: [xs[t.shape[0]] @ t for t in copies])}


def engine_ms_per_token(model_path, tokens: int, compile_: bool) -> tuple[float, list[int], float]:
    from sglang_duet import Engine

    t0 = time.perf_counter()
    eng = Engine(model_path=model_path, dtype="float32", policy="chunked", enable_torch_compile=compile_)
    init_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompt = [rng.randrange(100, min(40000, eng.core.model_config.vocab_size)) for _ in range(128)]
    params = {"temperature": 0, "ignore_eos": True}
    eng.generate(input_ids=prompt, sampling_params=dict(params, max_new_tokens=4))

    def cpu(n):
        c0 = time.process_time()
        out = eng.generate(input_ids=prompt, sampling_params=dict(params, max_new_tokens=n))
        return time.process_time() - c0, out["output_ids"]

    short, _ = cpu(2)
    long, ids = cpu(tokens + 2)
    return (long - short) / tokens * 1e3, ids[:16], init_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--enable-torch-compile", action="store_true")
    ap.add_argument("--skip-floor", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_floor:
        from sglang_duet.model_loader.loader import load_model

        floor = floor_ms(load_model(args.model_path, dtype="float32", tokenizer=False).model)
        print(f"floor over {floor.pop('MB'):.0f} MB of weights, 1 row, {args.threads} thread(s), CPU ms:")
        for k, v in floor.items():
            print(f"  {k:24s} {v:6.1f}")
    ms, ids, init_s = engine_ms_per_token(args.model_path, args.tokens, args.enable_torch_compile)
    print(f"engine, one request{' (torch.compile)' if args.enable_torch_compile else ''}: {ms:.1f} CPU ms per "
          f"decoded token (engine init {init_s:.1f} s, load {os.getloadavg()[0]:.1f}); first tokens {ids}")


if __name__ == "__main__":
    main()
