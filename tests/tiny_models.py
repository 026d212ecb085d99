"""Tiny random Llama / Qwen2 / Qwen3 checkpoints built with transformers: the parity oracle.

`build_tiny_model(family, path)` writes an HF folder (config.json, safetensors weights,
a byte-level BPE tokenizer trained here on a small corpus, a ChatML chat template) and
returns `path`. Everything is deterministic, offline and takes well under a second per
model. Families:
  llama   Llama 2 style, untied lm_head, GQA (4 heads / 2 kv heads)
  llama3  as llama plus llama3 RoPE scaling (long wavelengths scaled even at short context)
  smollm  SmolLM2 style: tied embeddings, GQA
  qwen2   QKV bias
  qwen3   QK-norm, head_dim (32) != hidden / heads (16)
"""
from __future__ import annotations

import os

FAMILIES = ("llama", "llama3", "smollm", "qwen2", "qwen3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 like SmolLM2
BOS_ID, EOS_ID = 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? It is Paris, a city on the Seine.",
    "Large language models generate text one token at a time.",
    "A serving engine batches requests to keep the accelerator busy.",
    "Prefill processes the prompt; decode produces one token per step.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Attention is all you need; rotary embeddings encode positions.",
    "Key-value caches store the keys and values of past tokens.",
]


def build_tokenizer(vocab_size: int = 384):
    """Byte-level BPE trained on _CORPUS, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _config(family: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0,
                  # larger than the default 0.02 so greedy picks have clear margins
                  initializer_range=0.1)
    if family in ("llama", "llama3", "smollm"):
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if family == "llama3":
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=(family == "smollm"))
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           tie_word_embeddings=False)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           tie_word_embeddings=False, attention_bias=False)
    raise ValueError(f"unknown tiny family {family!r}; known: {FAMILIES}")


def build_tiny_model(family: str, path, sharded: bool = False, seed: int = 0) -> str:
    """Write a tiny random `family` model (HF layout) into `path`; returns the path as str.

    sharded=True splits the weights into several safetensors files with an index
    (model.safetensors.index.json), exercising the sharded loader.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    cfg = _config(family, len(tok))
    torch.manual_seed(seed + FAMILIES.index(family))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    kwargs = {"max_shard_size": "60KB"} if sharded else {}
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path
