"""Which slice of each checkpoint tensor a tensor-parallel rank holds (Megatron/SGLang layout).

  column-parallel (split the output dim, dim 0 of the HF weight): q/k/v_proj, gate/up_proj
  row-parallel    (split the input dim, dim 1): o_proj, down_proj; their biases are replicated
                  and added once after the all-reduce
  vocab-parallel  (dim 0, ceil(vocab / size) rows per rank, the last rank padded with zero
                  rows): embed_tokens, lm_head
  replicated      norms (incl. Qwen3's q/k norms)

KV heads: with at least as many KV heads as ranks each rank holds num_kv / size of them; with
fewer, each KV head is replicated on size / num_kv ranks (rank r holds head r // (size / num_kv)),
as SGLang does, so every rank's query heads find their group's KV head locally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    start: int
    end: int  # exclusive; may be < start + the parameter's size (vocab padding)


@dataclass(frozen=True)
class TPLayout:
    """Per-rank sizes of a model config under `size`-way tensor parallelism."""

    rank: int
    size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (>= 1)
    kv_head_start: int  # first global KV head held here
    intermediate: int  # MLP width on this rank
    vocab_per_rank: int  # padded rows of embed_tokens / lm_head on this rank
    vocab_size: int  # the global (unpadded) vocabulary

    @classmethod
    def of(cls, cfg, rank: int = 0, size: int = 1) -> "TPLayout":
        heads, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        if heads % size:
            raise ValueError(f"--tp-size {size}: the model's {heads} attention heads do not split evenly")
        if inter % size:
            raise ValueError(f"--tp-size {size}: the model's intermediate size {inter} does not split evenly")
        if kv >= size:
            if kv % size:
                raise ValueError(f"--tp-size {size}: the model's {kv} KV heads do not split evenly")
            local_kv, kv_start = kv // size, rank * (kv // size)
        else:
            if size % kv:
                raise ValueError(f"--tp-size {size}: {kv} KV heads cannot be replicated evenly over {size} ranks")
            local_kv, kv_start = 1, rank // (size // kv)
        per_vocab = -(-cfg.vocab_size // size)
        return cls(rank, size, heads // size, local_kv, kv_start, inter // size, per_vocab, cfg.vocab_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def spec(self, name: str, head_dim: int) -> ShardSpec | None:
        """The slice of checkpoint tensor `name` (HF naming) on this rank; None: replicated."""
        if self.size == 1:
            return None
        leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
        module, kind = (leaf[0], leaf[1]) if len(leaf) == 2 else ("", leaf[0])
        if module == "q_proj":
            n = self.num_heads * head_dim
            return ShardSpec(0, self.rank * n, (self.rank + 1) * n)
        if module in ("k_proj", "v_proj"):
            return ShardSpec(0, self.kv_head_start * head_dim, (self.kv_head_start + self.num_kv_heads) * head_dim)
        if module in ("gate_proj", "up_proj"):
            n = self.intermediate
            return ShardSpec(0, self.rank * n, (self.rank + 1) * n)
        if module == "o_proj" and kind == "weight":
            n = self.num_heads * head_dim
            return ShardSpec(1, self.rank * n, (self.rank + 1) * n)
        if module == "down_proj" and kind == "weight":
            n = self.intermediate
            return ShardSpec(1, self.rank * n, (self.rank + 1) * n)
        if module in ("embed_tokens", "lm_head"):
            start = self.vocab_start
            return ShardSpec(0, min(start, self.vocab_size), min(start + self.vocab_per_rank, self.vocab_size))
        return None


def shard_tensor(t: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """This rank's slice of a whole tensor (GGUF: each tensor dequantised whole first, then sliced)."""
    if spec is None:
        return t
    return t.narrow(spec.dim, spec.start, spec.end - spec.start)


def read_shard(safe_file, name: str, spec: ShardSpec | None) -> torch.Tensor:
    """Read only this rank's slice from an open safetensors file (never the whole tensor)."""
    if spec is None:
        return safe_file.get_tensor(name)
    sl = safe_file.get_slice(name)
    if spec.dim == 0:
        return sl[spec.start:spec.end]
    return sl[:, spec.start:spec.end]
