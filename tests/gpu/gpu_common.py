"""Helpers for the GPU suite (tests/gpu): skip markers and small dummy models."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = [pytest.mark.gpu, requires_cuda]


# find_spec, not import: importing triton here (at collection) without a GPU would fix it in
# compiled mode before the CPU tests can switch it to its interpreter (TRITON_INTERPRET=1).
def have_flashinfer() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


requires_flashinfer = pytest.mark.skipif(not have_flashinfer(), reason="flashinfer is not installed")


def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


requires_triton = pytest.mark.skipif(not have_triton(), reason="triton is not installed")

# A small Llama with a realistic attention shape for the kernels (GQA 4, head_dim 128 like
# Qwen3-8B / Llama-3-8B) but few layers and a small vocabulary, so captures are quick.
SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
    "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 128, "vocab_size": 1000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def small_model(tmp_path, dtype: str = "bfloat16", seed: int = 0, std: float = 0.05):
    from sglang_duet.model_loader.loader import load_model

    path = os.path.join(str(tmp_path), "small-llama.json")
    with open(path, "w") as f:
        json.dump(SMALL_CONFIG, f)
    model = load_model(None, load_format="dummy", model_config_path=path, dtype=dtype, device="cuda", seed=seed).model
    model.init_dummy_weights(seed, std=std)  # larger than the default: clearer greedy margins
    return model


def save_small_model(tmp_path, seed: int = 0, std: float = 0.05) -> str:
    """SMALL_CONFIG with random weights as an HF folder (config.json + safetensors), made on the
    CPU so that the CPU reference and the GPU engine load the very same weights."""
    from safetensors.torch import save_file

    from sglang_duet.model_loader.loader import load_model

    folder = os.path.join(str(tmp_path), "small-llama")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SMALL_CONFIG, f)
    model = load_model(None, load_format="dummy", model_config_path=folder, dtype="float32", device="cpu").model
    model.init_dummy_weights(seed, std=std)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


# ---- comparing a bf16 run with a float32 reference -------------------------------------------------
TOP = 5
# How far below the float32 reference's best token (in log-probability) the token a bf16 run takes may be
# where it first leaves the reference. bf16 carries ~3 significant digits through every layer, so a small
# random model's logits move by a few hundredths: a bf16 CPU run of the small model below first left its
# float32 reference where the reference's top two were 0.011 apart (their median gap is 0.25). A token
# further below than this is an error, not a rounding.
NEAR_TIE_NATS = 0.1


def greedy_reference(path: str, new_tokens: int) -> tuple[list[list[int]], list[dict]]:
    """Four prompts (5 to 200 random ids) and the float32 CPU engine's greedy outputs on them, with the
    top-TOP log-probabilities at each token (what `first_divergences` reads)."""
    from sglang_duet.engine import Engine
    from sglang_duet.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 40, 200, 17)]
    ref = Engine(model_path=path, dtype="float32", device="cpu").generate(
        input_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_new_tokens=new_tokens,
                                                          ignore_eos=True, logprobs=True, top_logprobs=TOP))
    return prompts, ref


def first_divergences(ref_outs: list[dict], got: list[list[int]]) -> list[tuple[int, float | None]]:
    """(position, log-prob gap) where each run first takes another token than the reference: the gap
    between the reference's token and the taken one in the reference's own top-TOP list there (None: the
    taken token is not in it). Runs equal to the reference give nothing."""
    out = []
    for r, g_ in zip(ref_outs, got):
        lps = r["meta_info"]["output_token_logprobs"]
        j = next((j for j, (a, b) in enumerate(zip(r["output_ids"], g_)) if a != b), None)
        if j is None:
            continue
        top = dict(lps[j]["top"])
        out.append((j, top[r["output_ids"][j]] - top[g_[j]] if g_[j] in top else None))
    return out
