"""Read a llama-architecture GGUF file into an HF-style config dict, HF-named float32
tensors, a tokenizer and a chat template.

Weights are dequantised with the `gguf` package. llama.cpp's HF->GGUF converter permutes
the rows of q_proj and k_proj (per head it interleaves the two rotary halves, because
llama.cpp's "normal" RoPE rotates adjacent pairs while HF rotates (i, i + d/2) pairs);
`unpermute_qk` undoes that so the weights work with our rotate_half RoPE.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass
class GGUFContents:
    config: dict  # HF-style config.json contents
    chat_template: str | None
    tokenizer_pre: str | None  # llama.cpp pre-tokenizer name (tokenizer.ggml.pre)
    reader: object = field(repr=False, default=None)  # gguf.GGUFReader (memory-maps the file)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) pairs, q/k un-permuted, each dequantised only when reached: a
        caller that keeps a slice of each (a tensor-parallel rank) holds one whole tensor at a
        time, never the whole checkpoint."""
        n_heads, n_kv = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":  # read into the config by read_gguf
                continue
            w = torch.from_numpy(_dequantize(t))
            if t.name in _GLOBAL_MAP:
                yield _GLOBAL_MAP[t.name], w
                continue
            mt = _BLK.match(t.name)
            if mt is None or mt.group(2) not in _LAYER_MAP:
                raise ValueError(f"Unexpected GGUF tensor {t.name!r}")
            layer, kind, suffix = mt.groups()
            if kind == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv)
            yield f"model.layers.{layer}.{_LAYER_MAP[kind]}.{suffix}", w


def _dequantize(t) -> np.ndarray:
    import gguf

    arr = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    return arr.copy() if not arr.flags.writeable else arr  # F32/F16 come back as read-only views of the mmap


def _meta(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, rows (0, d/2, 1, d/2+1, ...) -> (0, 1, ..., d-1).

    The converter reshaped each head's rows as (2, d/2) and swapped the axes, so row 2i of
    a head holds HF row i and row 2i+1 holds HF row d/2 + i. Works for weights [out, in]
    and biases [out].
    """
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's forward permutation (HF -> GGUF layout); used by tests to check the inverse."""
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_config(reader, tensor_names: set[str]) -> dict:
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def m(key, default=None):
        return _meta(reader, f"llama.{key}", default)

    hidden = int(m("embedding_length"))
    heads = int(m("attention.head_count"))
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    vocab = m("vocab_size") or (len(tokens) if tokens is not None else None)
    head_dim = m("attention.key_length") or m("rope.dimension_count") or hidden // heads
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp's default when the key is absent is 10000.
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": any(n.startswith("blk.0.attn_q.bias") for n in tensor_names),
        "mlp_bias": False,
        # Dequantised weights are float32, but the natural compute dtype of the model on a
        # GPU is bf16 (what the original HF checkpoints use); CPU 'auto' still runs float32.
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
        "_name_or_path": _meta(reader, "general.name", "") or "",
    }
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    scaling_type = m("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
        cfg["rope_parameters"] = {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported")
    return cfg


def _llama3_scaling_from_factors(factors: np.ndarray, cfg: dict) -> dict:
    """Llama 3.x GGUFs carry per-frequency divisors (rope_freqs.weight) instead of parameters.
    Recover the HF llama3 parameters by matching the standard settings."""
    from sglang_duet.models.llama import rope_inv_freq

    base = rope_inv_freq(cfg["head_dim"], cfg["rope_theta"], None)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for orig in (8192, 4096, 2048, 16384):
            sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": orig}
            want = (base / rope_inv_freq(cfg["head_dim"], cfg["rope_theta"], sc)).numpy()
            if np.allclose(want, factors, rtol=1e-4):
                return sc
    raise ValueError("GGUF rope_freqs.weight does not match any llama3 rope scaling we know")


def read_gguf(path: str) -> GGUFContents:
    """The file's config, chat template and pre-tokenizer name now; its tensors lazily
    (`GGUFContents.iter_tensors`)."""
    import gguf  # lazy: only GGUF users pay for the import

    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    cfg = gguf_config(reader, names)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # llama 3.x: the scaling is a tensor, part of the config
            sc = _llama3_scaling_from_factors(_dequantize(t), cfg)
            cfg["rope_scaling"] = sc
            cfg["rope_parameters"] = {**sc, "rope_theta": cfg["rope_theta"]}
    return GGUFContents(config=cfg, chat_template=_meta(reader, "tokenizer.chat_template"),
                        tokenizer_pre=_meta(reader, "tokenizer.ggml.pre"), reader=reader)


def load_gguf_tokenizer(path: str, tokenizer_pre: str | None = None):
    """Tokenizer built by transformers' GGUF converter (works offline), fixed up for SmolLM.

    `tokenizer_pre` is GGUFContents.tokenizer_pre (saves re-opening the file)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    if tokenizer_pre == "smollm":
        # llama.cpp's 'smollm' pre-tokenizer (like the original tokenizer.json) splits every
        # digit before the byte-level regex; transformers' converter forgets that step.
        from tokenizers import pre_tokenizers

        bt = tok.backend_tokenizer
        bt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bt.pre_tokenizer])
    return tok


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")
