"""What one forward launch needs to know about its batch, and the attention backend interface.

Layout follows SGLang/FlashInfer "ragged" conventions with page size 1:
  * the T new tokens of all requests are concatenated (request order, position order);
  * `qo_indptr` delimits each request's new tokens inside those T rows;
  * `kv_indptr`/`kv_indices` list, per request, the KV-pool slots of ALL its tokens
    (cached prefix + the new ones) in position order, which is exactly what a paged
    attention kernel with page size 1 consumes.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] long: new tokens of all requests, concatenated
    positions: torch.Tensor  # [T] long: absolute position of each new token
    out_cache_loc: torch.Tensor  # [T] long: KV slot where each new token's k/v is written
    qo_indptr: torch.Tensor  # [B+1] int32: new-token offsets per request
    kv_indptr: torch.Tensor  # [B+1] int32: offsets into kv_indices per request
    kv_indices: torch.Tensor  # [sum seq_lens] long: slots of all tokens, position order
    seq_lens: torch.Tensor  # [B] int32: prefix + new tokens
    prefix_lens: torch.Tensor  # [B] int32: tokens already in the cache
    sample_indices: torch.Tensor  # [N] long: rows of T whose logits are wanted
    # Host mirrors so backends can plan without a device->host sync (FlashInfer's plan()
    # and the torch reference both need the lengths on the host).
    seq_lens_cpu: list[int] = field(default_factory=list)
    prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_lens_cpu: list[int] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_cpu) if self.seq_lens_cpu else int(self.seq_lens.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def is_decode_only(self) -> bool:
        """Every request adds exactly one token (decode kernels / CUDA graphs apply)."""
        return self.num_tokens == self.num_requests

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @classmethod
    def build(
        cls,
        requests: Sequence[tuple[Sequence[int], int, Sequence[int] | torch.Tensor, bool]],
        device: torch.device | str = "cpu",
    ) -> "ForwardBatch":
        """Build from (new input ids, start position, kv slots, wants logits) per request.

        `kv_slots` covers positions [0, start_pos + len(input_ids)) and may be longer:
        slots reserved ahead for look-ahead decoding are ignored here. This flattens every slot
        list (O(batch x context) host work): the executors build the same batch from the device's
        req-to-token table instead (`ReqToTokenTable.forward_batch`) when the work has table rows;
        this stays for work built by hand and as the tests' oracle.
        """
        if not requests:
            raise ValueError("ForwardBatch.build needs at least one request")
        ids: list[int] = []
        pos: list[int] = []
        out_loc: list[int] = []
        kv_idx: list[int] = []
        qo_indptr, kv_indptr = [0], [0]
        seq_lens, prefix_lens, extend_lens, sample = [], [], [], []
        for input_ids, start, slots, wants_logits in requests:
            n = len(input_ids)
            if n == 0:
                raise ValueError("a request in a forward batch must add at least one token")
            end = start + n
            if isinstance(slots, torch.Tensor):
                slots = slots[:end].tolist()
            else:
                slots = list(slots[:end])
            if len(slots) < end:
                raise ValueError(f"kv_slots has {len(slots)} slots, needs {end} (start {start} + {n} new)")
            ids.extend(int(t) for t in input_ids)
            pos.extend(range(start, end))
            out_loc.extend(slots[start:end])
            kv_idx.extend(slots)
            qo_indptr.append(qo_indptr[-1] + n)
            kv_indptr.append(kv_indptr[-1] + end)
            seq_lens.append(end)
            prefix_lens.append(start)
            extend_lens.append(n)
            if wants_logits:
                sample.append(qo_indptr[-1] - 1)

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        return cls(
            input_ids=t(ids, torch.long),
            positions=t(pos, torch.long),
            out_cache_loc=t(out_loc, torch.long),
            qo_indptr=t(qo_indptr, torch.int32),
            kv_indptr=t(kv_indptr, torch.int32),
            kv_indices=t(kv_idx, torch.long),
            seq_lens=t(seq_lens, torch.int32),
            prefix_lens=t(prefix_lens, torch.int32),
            sample_indices=t(sample, torch.long),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=prefix_lens,
            extend_lens_cpu=extend_lens,
        )


class AttentionBackend(abc.ABC):
    """One object per executor lane.

    `plan` is called once per forward launch with the batch (index work shared by all
    layers happens there); `run` is called once per layer with the new tokens' q, k, v
    (RoPE already applied) shaped [T, H, D], [T, H_kv, D], [T, H_kv, D]. It must store
    k and v at `fb.out_cache_loc` in the pool, unless the caller already did (kv_stored=True:
    the fused RoPE kernel writes them, kernels/fused_ops.py), and return the attention output
    [T, H * D].
    """

    name: str = "base"
    _fb: ForwardBatch | None = None  # the batch of the last plan (or graph plan)

    @abc.abstractmethod
    def plan(self, fb: ForwardBatch) -> None: ...

    @abc.abstractmethod
    def run(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pool,
            kv_stored: bool = False) -> torch.Tensor: ...

    def new_token_slots(self) -> torch.Tensor | None:
        """The KV slots of the planned batch's new tokens (fb.out_cache_loc), where run() stores k and v;
        None before a plan."""
        return None if self._fb is None else self._fb.out_cache_loc
