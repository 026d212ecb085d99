"""Offline generation throughput: sglang-duet's Engine vs transformers `generate` on the same
model, prompts and lengths, on this machine. Prints tokens/s of both and their ratio.

    python -m benchmark.offline_throughput [--model-path P] [--batch 16] [--input-len 128] [--output-len 64]
        [--dtype auto|float32|bfloat16] [--enable-torch-compile] [--output benchmark/results/FILE.md]

Both generate exactly `output_len` tokens per prompt (eos ignored), greedy, in the same dtype (auto: the
engine's CPU choice, bf16 only where the CPU has native bf16, else float32).
Besides tokens/s (wall clock) it reports each side's process CPU seconds: on a shared machine the
wall clock depends on the other tenants, CPU time much less so (both numbers, and the load average).
transformers runs the whole batch in one `generate` call with left padding (its fastest
offline mode); the engine gets all prompts at once and batches them itself.
"""
from __future__ import annotations

import argparse
import os
import random
import time


def make_prompts(tokenizer, batch: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.all_special_ids)]
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(batch)]


def run_engine(model_path, prompts, output_len, policy, dtype, compile_):
    from sglang_duet import Engine

    engine = Engine(model_path=model_path, dtype=dtype, policy=policy, enable_torch_compile=compile_)
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    # warm-up: two requests so that a compiled decode step (batches of 2+) compiles here, not in the timing
    engine.generate(input_ids=prompts[:2], sampling_params=dict(params, max_new_tokens=3))
    t0, c0 = time.perf_counter(), time.process_time()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    step = getattr(engine.core.executor, "decode_step", None)  # compiled by default on a CPU with a compiler
    compiled = step is not None and step.active
    return sum(len(o["output_ids"]) for o in outs), dt, cpu, [o["output_ids"] for o in outs], compiled


def run_transformers(model_dir, prompts, output_len, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, attention_mask=mask, **kw)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    gen = out[:, width:]
    return gen.numel(), dt, cpu, gen.tolist()


def machine_name() -> str:
    """CPU model, cores this process may use, torch's vector capability and the bf16 verdict."""
    import torch

    from sglang_duet.cost_model.cpu_calibration import cpu_name
    from sglang_duet.model_loader.loader import cpu_has_native_bf16

    model = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores, torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}"
            f" (native bf16: {'yes' if cpu_has_native_bf16() else 'no'}), {torch.get_num_threads()} threads")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF folder; default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--policy", default="aggregated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="both sides' dtype (auto: the engine's CPU choice)")
    ap.add_argument("--enable-torch-compile", action="store_true", help="the engine's compiled decode step")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: torch's, one per core); on a machine shared "
                         "with other jobs use fewer than the cores, or OpenMP's spinning threads wait on each other")
    ap.add_argument("--output", default=None, help="append the result (markdown) to this file")
    args = ap.parse_args(argv)

    from sglang_duet.model_loader.embedded import default_model_path
    from sglang_duet.model_loader.loader import load_tokenizer

    model_dir = args.model_path or default_model_path()
    tok = load_tokenizer(model_dir)
    prompts = make_prompts(tok, args.batch, args.input_len, args.seed)
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    from sglang_duet.model_loader.loader import resolve_dtype

    dtype = resolve_dtype(args.dtype, "float32", __import__("torch").device("cpu"))
    load0 = os.getloadavg()[0]
    n_e, t_e, c_e, out_e, compiled = run_engine(model_dir, prompts, args.output_len, args.policy, dtype,
                                      args.enable_torch_compile)
    n_t, t_t, c_t, out_t = run_transformers(model_dir, prompts, args.output_len, dtype)
    load1 = os.getloadavg()[0]
    same = sum(a == b for a, b in zip(out_e, out_t))
    flags = (f" --dtype {args.dtype}" if args.dtype != "auto" else "") + \
        (f" --threads {args.threads}" if args.threads else "") + \
        (" --enable-torch-compile" if args.enable_torch_compile else "")
    engine_name = f"sglang-duet ({args.policy}{', torch.compile' if compiled else ', eager'})"
    lines = [
        f"## offline throughput: {os.path.basename(os.path.normpath(model_dir))}, batch {args.batch}, "
        f"input {args.input_len}, output {args.output_len}, {str(dtype).removeprefix('torch.')}",
        f"machine: {machine_name()}",
        f"command: python -m benchmark.offline_throughput --batch {args.batch} --input-len {args.input_len} "
        f"--output-len {args.output_len}{flags}",
        f"load average (1 min) before / after: {load0:.1f} / {load1:.1f}",
        "",
        "| engine | generated tokens | seconds | tokens/s | CPU seconds | tokens per CPU second |",
        "|---|---|---|---|---|---|",
        f"| {engine_name} | {n_e} | {t_e:.2f} | {n_e / t_e:.1f} | {c_e:.2f} | {n_e / c_e:.1f} |",
        f"| transformers generate | {n_t} | {t_t:.2f} | {n_t / t_t:.1f} | {c_t:.2f} | {n_t / c_t:.1f} |",
        "",
        f"ratio (sglang-duet / transformers): {(n_e / t_e) / (n_t / t_t):.2f}x tokens/s, "
        f"{(n_e / c_e) / (n_t / c_t):.2f}x tokens per CPU second; "
        f"greedy outputs identical for {same}/{len(prompts)} prompts",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
