"""Attention-aware roofline cost model of one forward pass.

A batch is a list of requests (q_r new tokens, c_r tokens already cached). Each operator
gets FLOPs and HBM bytes; its time on S SMs is

    max(FLOPs / compute(S), bytes / (bandwidth(S) * bandwidth_share)) + kernels * launch_overhead

with compute(S) and bandwidth(S) from the HardwareSpec curves. Token-level operators
(projections, MLP, norms) scale with the total new tokens T; attention scales with each
request's context, which is what makes a long-context decode batch memory-bound and a long
prefill compute-bound. Pure Python (no torch): the policy calls this many times per step.

Deliberate simplifications (see docs/cost-model.md): the residual add is folded into the
norms; sampling, the logits cast and CPU scheduling are not modelled; a mixed prefill+decode
attention kernel is one roofline over summed FLOPs and bytes.

A calibrated hardware file adds what measured model steps show beyond the inventory at the
curves' rates (`hardware.StepTerms`, fitted by cost_model/fit.py): the projection GEMMs' efficiency
relative to the sweep's large GEMM, their padding rows at small M, their operand-streaming rate
relative to the copy, and the activation traffic of the unfused token-wise operators; the fixed
time per step is the launch overhead times the inventory's kernels. These change each operator's
FLOPs and bytes *as the roofline divides them* (OpCost.flops/bytes are those effective amounts),
so every reader of the inventory (the policies' vectorised pricer, the emulator's truth) prices
them as `batch_time` does: each stays affine in the batch summary (T, R, attention pairs, KV
tokens). With the defaults they are the plain FLOPs and bytes, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sglang_duet.models.config import ModelConfig

from .hardware import HardwareSpec, configs_dir


@dataclass(frozen=True)
class OpCost:
    name: str
    flops: float  # over all layers
    bytes: float  # HBM bytes read + written, over all layers
    kernels: int  # kernel launches, over all layers (each pays the launch overhead)
    time: float  # seconds
    bound: str  # "compute" or "memory": which roofline term won


def _model_path(name_or_path: str) -> str:
    p = Path(name_or_path)
    if p.exists():
        return str(p)
    cand = configs_dir() / "models" / f"{str(name_or_path).lower()}.json"
    if not cand.exists():
        known = sorted(f.stem for f in (configs_dir() / "models").glob("*.json"))
        raise FileNotFoundError(f"unknown model {name_or_path!r}; known: {known} or a path")
    return str(cand)


class CostModel:
    def __init__(self, model: ModelConfig, hw: HardwareSpec, dtype_bytes: int = 2):
        self.model, self.hw, self.b = model, hw, dtype_bytes
        m = model
        self.L = m.num_hidden_layers
        self.h, self.I, self.V = m.hidden_size, m.intermediate_size, m.vocab_size
        self.qs, self.kvs, self.hd = m.q_size, m.kv_size, m.head_dim
        self.H = m.num_attention_heads
        self.qkv_n = self.qs + 2 * self.kvs

    @classmethod
    def load(cls, model: str, hardware: str, dtype_bytes: int = 2) -> "CostModel":
        """CostModel.load('qwen3-8b', 'h100'): names from configs/, or paths."""
        return cls(ModelConfig.from_path(_model_path(model)), HardwareSpec.load(hardware), dtype_bytes)

    # -- operator inventory -------------------------------------------------------------------
    def _ops(self, reqs: Sequence[tuple[int, int]]) -> list[tuple[str, float, float, int, bool]]:
        """(name, flops, bytes, kernels, is_attention) per operator, summed over layers."""
        b, L, h, I, V = self.b, self.L, self.h, self.I, self.V
        qs, kvs, n = self.qs, self.kvs, self.qkv_n
        R = len(reqs)
        T = 0
        attn_flops = 0.0
        kv_tokens = 0  # tokens whose K/V are read: c_r + q_r
        for q, c in reqs:
            if q < 1 or c < 0:
                raise ValueError(f"bad request shape (q={q}, c={c}): need q >= 1, c >= 0")
            T += q
            kv_tokens += c + q
            # Causal: new token i (0-based) attends to c + i + 1 keys; QK^T and PV are 2 FLOPs
            # per multiply-add each, hence 4 * heads * head_dim per (query, key) pair.
            attn_flops += q * (c + (q + 1) / 2)
        attn_flops *= 4 * self.H * self.hd * L
        bias = self.model.attention_bias

        terms = self.hw.step_terms
        pad, ge, gbw = terms.gemm_pad_rows, terms.gemm_efficiency, terms.gemm_bandwidth_efficiency
        act = terms.activation_traffic

        def gemm(name: str, rows: int, flops: float, nbytes: float, kernels: int):
            # A GEMM of `rows` rows computes as if it had `pad` more (flops / rows per row) at
            # `ge` of the curve's rate, and streams its operands at `gbw` times the copy's rate.
            return (name, (flops + pad * (flops / rows)) / ge, nbytes / gbw, kernels, False)

        def token_op(name: str, flops: float, nbytes: float, kernels: int):
            # A token-wise operator that is neither a GEMM nor attention: its bytes are one
            # fused pass; `act` is how many the real forward makes.
            return (name, flops, nbytes * act, kernels, False)

        def norm(tokens: int, width: int, weight: int) -> tuple[float, float]:
            # RMSNorm: square, sum, scale, weight; reads x, writes y, reads the weight.
            return 4 * tokens * width, (2 * tokens * width + weight) * b

        ops: list[tuple[str, float, float, int, bool]] = [
            token_op("embed", 0.0, 2 * T * h * b, 1),  # gather rows, write activations
        ]
        f, by = norm(T, h, h)
        ops.append(token_op("attn_norm", f * L, by * L, L))
        ops.append(gemm(
            "qkv_proj", T,
            (2 * T * h * n + (T * n if bias else 0)) * L,
            (h * n + T * h + T * n + (n if bias else 0)) * b * L,
            L,
        ))
        if self.model.qk_norm:
            f, by = norm(T, qs + kvs, 2 * self.hd)
            ops.append(token_op("qk_norm", f * L, by * L, L))
        # RoPE in place on q and k: ~3 FLOPs per element (two multiplies, one add).
        ops.append(token_op("rope", 3 * T * (qs + kvs) * L, 2 * T * (qs + kvs) * b * L, L))
        # Attention: read K/V of c_r + q_r tokens, read q, write o, write the new K/V
        # (the append kernel). Two kernels per layer.
        attn_bytes = (kv_tokens * 2 * kvs + T * 2 * kvs + 2 * T * qs) * b * L
        ops.append(("attention", attn_flops, attn_bytes, 2 * L, True))
        ops.append(gemm("o_proj", T, 2 * T * qs * h * L, (qs * h + T * qs + T * h) * b * L, L))
        f, by = norm(T, h, h)
        ops.append(token_op("mlp_norm", f * L, by * L, L))
        ops.append(gemm("gate_up_proj", T, 4 * T * h * I * L, (2 * I * h + T * h + 2 * T * I) * b * L, L))
        # silu(gate) * up: ~4 FLOPs per output; reads both halves, writes one.
        ops.append(token_op("act", 4 * T * I * L, 3 * T * I * b * L, L))
        ops.append(gemm("down_proj", T, 2 * T * I * h * L, (I * h + T * I + T * h) * b * L, L))
        f, by = norm(T, h, h)
        ops.append(token_op("final_norm", f, by, 1))
        # LM head only for the rows that sample: the last new token of each request.
        ops.append(gemm("lm_head", R, 2 * R * h * V, (V * h + R * h + R * V) * b, 1))
        return ops

    # -- timing -------------------------------------------------------------------------------
    def breakdown(self, reqs: Sequence[tuple[int, int]], sms: int | None = None,
                  bandwidth_share: float = 1.0) -> list[OpCost]:
        if not reqs:
            return []
        comp, bw, attn_comp, ovh = self._rates(sms, bandwidth_share)
        out = []
        for name, flops, nbytes, kernels, is_attn in self._ops(reqs):
            tc = flops / (attn_comp if is_attn else comp)
            tm = nbytes / bw
            out.append(OpCost(name, flops, nbytes, kernels, max(tc, tm) + kernels * ovh,
                              "compute" if tc > tm else "memory"))
        return out

    def batch_time(self, reqs: Sequence[tuple[int, int]], sms: int | None = None,
                   bandwidth_share: float = 1.0) -> float:
        """Seconds for one forward pass of `reqs` [(q_r, c_r), ...] on `sms` SMs (None: all).

        `bandwidth_share` < 1 models another lane competing for HBM (SM partitions split
        SMs, not memory bandwidth); the emulator sets it from its contention model."""
        if not reqs:
            return 0.0
        comp, bw, attn_comp, ovh = self._rates(sms, bandwidth_share)
        t = 0.0
        for _, flops, nbytes, kernels, is_attn in self._ops(reqs):
            t += max(flops / (attn_comp if is_attn else comp), nbytes / bw) + kernels * ovh
        return t

    def _rates(self, sms, bandwidth_share):
        if not 0 < bandwidth_share <= 1:
            raise ValueError(f"bandwidth_share must be in (0, 1], got {bandwidth_share}")
        comp = self.hw.compute(sms)
        return (comp, self.hw.bandwidth(sms) * bandwidth_share,
                comp * self.hw.attention_efficiency, self.hw.launch_overhead_s)

    # -- conveniences -------------------------------------------------------------------------
    def decode_time(self, batch: int, ctx: int | Sequence[int], sms: int | None = None,
                    bandwidth_share: float = 1.0) -> float:
        """One decode step of `batch` requests with `ctx` cached tokens each (or a list)."""
        ctxs = [ctx] * batch if isinstance(ctx, int) else list(ctx)
        if len(ctxs) != batch:
            raise ValueError(f"{len(ctxs)} contexts for a batch of {batch}")
        return self.batch_time([(1, c) for c in ctxs], sms, bandwidth_share)

    def prefill_time(self, tokens: int, sms: int | None = None, cached: int = 0,
                     bandwidth_share: float = 1.0) -> float:
        """One prefill (chunk) of `tokens` new tokens after `cached` cached ones."""
        return self.batch_time([(tokens, cached)], sms, bandwidth_share)

    def weight_bytes(self) -> int:
        """Weight bytes read by every forward pass (all but the embedding table, of which
        only the gathered rows are read; a tied LM head still reads the whole matrix)."""
        params = self.model.num_params()
        if not self.model.tie_word_embeddings:
            params -= self.V * self.h
        return params * self.b
