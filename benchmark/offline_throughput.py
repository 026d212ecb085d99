"""Offline generation throughput: sglang-duet's Engine vs transformers `generate` on the same
model, prompts and lengths, on this machine. Prints tokens/s of both and their ratio.

    python -m benchmark.offline_throughput [--model-path P] [--batch 16] [--input-len 128] [--output-len 64]

Both generate exactly `output_len` tokens per prompt (eos ignored), greedy, float32 on CPU.
transformers runs the whole batch in one `generate` call with left padding (its fastest
offline mode); the engine gets all prompts at once and batches them itself.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import time


def make_prompts(tokenizer, batch: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in set(tokenizer.all_special_ids)]
    return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(batch)]


def run_engine(model_path, prompts, output_len, policy):
    from sglang_duet import Engine

    engine = Engine(model_path=model_path, dtype="float32", policy=policy)
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    engine.generate(input_ids=prompts[:1], sampling_params=dict(params, max_new_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    return sum(len(o["output_ids"]) for o in outs), dt, [o["output_ids"] for o in outs]


def run_transformers(model_dir, prompts, output_len):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        dt = time.perf_counter() - t0
    gen = out[:, width:]
    return gen.numel(), dt, gen.tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF folder; default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--policy", default="aggregated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="append the result (markdown) to this file")
    args = ap.parse_args(argv)

    from sglang_duet.model_loader.embedded import default_model_path
    from sglang_duet.model_loader.loader import load_tokenizer

    model_dir = args.model_path or default_model_path()
    tok = load_tokenizer(model_dir)
    prompts = make_prompts(tok, args.batch, args.input_len, args.seed)
    n_e, t_e, out_e = run_engine(model_dir, prompts, args.output_len, args.policy)
    n_t, t_t, out_t = run_transformers(model_dir, prompts, args.output_len)
    same = sum(a == b for a, b in zip(out_e, out_t))
    import torch

    lines = [
        f"## offline throughput: {os.path.basename(os.path.normpath(model_dir))}, batch {args.batch}, "
        f"input {args.input_len}, output {args.output_len}, float32",
        f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)",
        f"command: python -m benchmark.offline_throughput --batch {args.batch} --input-len {args.input_len} "
        f"--output-len {args.output_len}",
        "",
        "| engine | generated tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        f"| sglang-duet ({args.policy}) | {n_e} | {t_e:.2f} | {n_e / t_e:.1f} |",
        f"| transformers generate | {n_t} | {t_t:.2f} | {n_t / t_t:.1f} |",
        "",
        f"ratio (sglang-duet / transformers): {(n_e / t_e) / (n_t / t_t):.2f}x; "
        f"greedy outputs identical for {same}/{len(prompts)} prompts",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
