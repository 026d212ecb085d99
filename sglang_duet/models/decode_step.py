"""The CPU decode step compiled with torch.compile (inductor's C++ backend): `--enable-torch-compile`.

What it compiles: ONE decoder layer as a function of (activations, the layer's weights, its K/V
buffers, the step's slot table). Every layer of the model runs the same compiled code with its own
weights, so the compile cost is one layer's, not the model's (a whole-model graph of 30 layers took
minutes on a 2-core machine). Batch size and context length are dynamic dimensions: one compile serves
every decode batch of 4+ requests; up to 3 requests take a second layer function that multiplies with
the model's [in, out] weight copies (models/llama.py, GEMV_MAX_ROWS), compiled for one request and for
2-3, so start-up compiles three graphs.

Why it is faster than the eager layer:
  * attention reads the paged KV pool in place: `k_buf[slots]` is fused by inductor into the score
    and output reductions, so the per-step gather (and the transposed copies) of the whole context
    of every request are never materialised;
  * RMSNorm, RoPE, the residual adds, SiLU * up and the softmax are fused loops instead of ~20
    separate ops per layer (each its own pass over memory and its own Python dispatch).
The GEMMs stay extern calls (the same BLAS the eager path uses).

Only decode-only batches (one new token per request) take this path; prefill and mixed batches run
the eager model. The executor compiles at start-up (`warm_up`), so no request waits for the compiler. It is refused (eager runs, a warning says why) when the model is tensor-parallel,
not on a CPU, when no C++ compiler is found, or when compiling or running the compiled step raises.
Numerics: the same formulas as the eager layer (float32 RMSNorm and softmax); inductor's reductions
sum in a different order, so logits differ from eager in the last bits (tests bound the difference
and check greedy tokens).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import torch
import torch.nn.functional as F

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import PADDING_SLOT
from sglang_duet.models.llama import GEMV_MAX_ROWS

logger = logging.getLogger(__name__)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else g++/c++/clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def decode_slot_table(fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [b, L] long (row i: the KV slots of request i's positions, padded with the padding slot)
    and valid [b, L] bool (position < seq_len), L = the longest sequence, from the batch's flat
    kv_indices without a per-request Python loop."""
    seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
    width = max(seq)
    lens = fb.seq_lens.to(torch.long)
    cols = torch.arange(width, device=fb.device)
    valid = cols[None, :] < lens[:, None]
    idx = fb.kv_indptr[:-1].to(torch.long)[:, None] + cols[None, :]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    slots = torch.where(valid, fb.kv_indices[idx], torch.full_like(idx, PADDING_SLOT))
    return slots, valid


def paged_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """One query per request over the paged pool: q [b, H, D], k_buf/v_buf [slots, H_kv, D], slots and
    valid [b, L] -> [b, H, D]. Written as index + broadcast-multiply + reduce so that inductor fuses
    the pool reads into the reductions (eagerly it gathers, which is only the fallback's concern).
    Query head h reads KV head h // (H / H_kv), as HF's repeat_kv."""
    b, H, D = q.shape
    hkv = k_buf.shape[1]
    L = slots.shape[1]
    k = k_buf[slots].view(b, L, hkv, 1, D).float()  # float32 math whatever the pool's dtype (no-op in fp32)
    v = v_buf[slots].view(b, L, hkv, 1, D).float()
    scores = (q.float().view(b, 1, hkv, H // hkv, D) * k).sum(-1) * (D ** -0.5)  # [b, L, H_kv, n_rep]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1)
    return (probs[..., None] * v).sum(1).reshape(b, H, D).to(q.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w_t (+ b) against an [in, out] weight: models/llama.py's few-row product (linear_rows)."""
    return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)


def make_decode_layer(num_heads: int, num_kv_heads: int, head_dim: int, eps: float, one_row: bool = False):
    """The decoder layer of models/llama.py as one function (the ints are constants of its graph).

    one_row=True: the layer of a decode step of up to GEMV_MAX_ROWS requests, whose q/k/v, o and gate/up
    weights are the model's [in, out] copies (LlamaForCausalLM.add_gemv_weights), multiplied as x @ w_t. It is its
    own function (its own code object), so torch.compile keeps its graph apart from the batched one."""
    H, hkv, D = num_heads, num_kv_heads, head_dim

    def attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf):
        T = x.shape[0]
        q, k, v = qkv.split([H * D, hkv * D, hkv * D], dim=-1)
        q, k, v = q.view(T, H, D), k.view(T, hkv, D), v.view(T, hkv, D)
        if q_norm is not None:
            q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_buf.index_copy_(0, loc, k.to(k_buf.dtype))
        v_buf.index_copy_(0, loc, v.to(v_buf.dtype))
        return paged_decode_attention(q, k_buf, v_buf, slots, valid).reshape(T, H * D)

    def decode_layer(x, cos, sin, loc, slots, valid, ln1, w_qkv, b_qkv, q_norm, k_norm, w_o, b_o,
                     ln2, w_gate_up, b_gate_up, w_down, b_down, k_buf, v_buf):
        qkv = F.linear(_rms_norm(x, ln1, eps), w_qkv, b_qkv)
        o = attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf)
        x = x + F.linear(o, w_o, b_o)
        gate, up = F.linear(_rms_norm(x, ln2, eps), w_gate_up, b_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w_down, b_down)

    def decode_layer_one_row(x, cos, sin, loc, slots, valid, ln1, w_qkv_t, b_qkv, q_norm, k_norm, w_o_t, b_o,
                             ln2, w_gate_up_t, b_gate_up, w_down, b_down, k_buf, v_buf):
        qkv = _linear_t(_rms_norm(x, ln1, eps), w_qkv_t, b_qkv)
        o = attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf)
        x = x + _linear_t(o, w_o_t, b_o)
        gate, up = _linear_t(_rms_norm(x, ln2, eps), w_gate_up_t, b_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w_down, b_down)  # down_proj: [out, in] is as fast (llama.py)

    return decode_layer_one_row if one_row else decode_layer


def _layer_weights(layer, one_row: bool = False) -> tuple:
    """The layer's tensors in make_decode_layer's order; one_row: the [in, out] copies of q/k/v, o, gate/up."""
    a, m = layer.self_attn, layer.mlp
    if a.qkv_weight is None or m.gate_up_weight is None:
        a.fuse()
        m.fuse()
    w_qkv, w_o, w_gate_up = ((a.qkv_weight_t, a.o_weight_t, m.gate_up_weight_t) if one_row
                             else (a.qkv_weight, a.o_proj.weight, m.gate_up_weight))
    return (layer.input_layernorm.weight, w_qkv, a.qkv_bias,
            a.q_norm.weight if a.q_norm is not None else None, a.k_norm.weight if a.k_norm is not None else None,
            w_o, a.o_proj.bias, layer.post_attention_layernorm.weight,
            w_gate_up, m.gate_up_bias, m.down_proj.weight, m.down_proj.bias)


class CompiledDecodeStep:
    """`step(fb)`: logits of a decode-only batch through the compiled layer, or None when the caller
    must run the eager model (not a decode-only batch, or the compiled path is off).

    Two layer functions: a batched one for 4+ requests (batch and context dynamic), and one for up to
    GEMV_MAX_ROWS requests that multiplies with the model's [in, out] weight copies
    (LlamaForCausalLM.add_gemv_weights; SmolLM2 on one AVX2 core, one request: 42 -> 33 ms per step
    against the eager model with the same copies), compiled for one request (context dynamic) and for 2-3
    (batch dynamic too): three graphs. A model without those copies runs a single request eagerly and
    2+ requests through the batched function."""

    def __init__(self, model, kv_pool, compile_fn=None):
        """compile_fn: how to compile the layer function (default torch.compile with dynamic batch and
        context); tests pass a failing one to check the fallback."""
        self.model = model
        self.kv_pool = kv_pool
        self.reason_off: str | None = None
        cfg = model.config
        layout = model.layout
        #: requests per step that take the few-row function (the model's copies); 0 without copies
        self.few_rows = GEMV_MAX_ROWS if getattr(model, "has_gemv_weights", False) else 0
        variants = (False, True) if self.few_rows else (False,)
        self._layers = {v: make_decode_layer(layout.num_heads, layout.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
                                             one_row=v) for v in variants}
        self._compile = compile_fn or self._compile_layer
        self._compiled: dict[bool, object] = {}  # by few-row or not; torch.compile keeps each one's graphs
        self._graphs: set[str] = set()  # "batched", "one", "few" once each has run
        self._weights = {v: [_layer_weights(layer, v) for layer in model.model.layers] for v in variants}
        #: seconds the first compiled step of each graph took (compile included), summed, once they ran
        self.compile_s: float | None = None

    def _compile_layer(self, fn):
        """torch.compile with inductor; the batch and context dimensions are marked dynamic per call."""
        return torch.compile(fn, fullgraph=True)

    @classmethod
    def build(cls, model, kv_pool, device) -> "CompiledDecodeStep | None":
        """The compiled step where it can run, else None (with a log line saying why)."""
        why = None
        if torch.device(device).type != "cpu":
            why = "not on a CPU (the GPU decode step has CUDA graphs)"
        elif model.tp.size > 1 or model.step_broadcaster is not None:
            why = "tensor parallelism (every rank must run the broadcast forward)"
        elif cpp_compiler() is None:
            why = "no C++ compiler found ($CXX, g++, c++, clang++)"
        if why:
            logger.warning("--enable-torch-compile: the decode step runs eagerly: %s", why)
            return None
        return cls(model, kv_pool)

    def warm_up(self) -> None:
        """Compile now (start-up), not at the first decode mid-traffic: a decode step of 4 requests (2 without
        the few-row function), then of 1 and 2, over the padding slot, whose KV is zeroed again afterwards
        (it must stay finite and is masked wherever it is read)."""
        # batch and context of distinct sizes, so torch does not tie the two dynamic dimensions together;
        # built under inference mode like the executor's batches (else the guards differ: a second compile)
        sizes = (self.few_rows + 1, 1, 2) if self.few_rows else (2,)
        with torch.inference_mode():
            for n in sizes:
                self(ForwardBatch.build([([0], 2, [PADDING_SLOT] * 3, True)] * n, self.kv_pool.device))
            self.kv_pool.buffer[:, :, PADDING_SLOT].zero_()

    @property
    def active(self) -> bool:
        return self.reason_off is None

    def __call__(self, fb: ForwardBatch) -> torch.Tensor | None:
        if self.reason_off is not None or not fb.is_decode_only:
            return None
        n = fb.num_requests
        few = n <= self.few_rows
        if n == 1 and not few:
            # without the copies a single request runs eagerly: its matmuls are BLAS gemv there, which beat
            # the padded two-row GEMMs a batched graph would need
            return None
        graph = ("one" if n == 1 else "few") if few else "batched"
        first = graph not in self._graphs
        start = time.perf_counter()
        try:
            if few not in self._compiled:
                self._compiled[few] = self._compile(self._layers[few])
            logits = self._run(fb, few)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure falls back to the eager model
            self.reason_off = f"{type(e).__name__}: {e}"
            logger.warning("torch.compile'd decode step failed (%s): decode runs eagerly from now on",
                           self.reason_off.splitlines()[0][:300])
            return None
        if first:
            self._graphs.add(graph)
            took = time.perf_counter() - start
            self.compile_s = (self.compile_s or 0.0) + took
            logger.info("decode step (%s) compiled in %.1f s (first step included)", graph, took)
        return logits

    def _run(self, fb: ForwardBatch, few: bool = False) -> torch.Tensor:
        model = self.model
        x = model.embed(fb.input_ids)
        positions, loc = fb.positions, fb.out_cache_loc
        slots, valid = decode_slot_table(fb)
        cos, sin = model.rope_cos_sin(positions, x.dtype)
        self._mark_dynamic(x, cos, sin, loc, slots, valid, batch=fb.num_requests > 1)
        pool = self.kv_pool
        layer = self._compiled[few]
        for i, w in enumerate(self._weights[few]):
            k_buf, v_buf = pool.get_kv(i)
            x = layer(x, cos, sin, loc, slots, valid, *w, k_buf, v_buf)
        return model.compute_logits(x, fb.sample_indices)

    @staticmethod
    def _mark_dynamic(x, cos, sin, loc, slots, valid, batch: bool = True) -> None:
        """Batch (dim 0 of all; not for one request) and context (dim 1 of the slot table) vary
        from step to step: one graph each."""
        mark = torch._dynamo.mark_dynamic
        if batch:
            for t in (x, cos, sin, loc, slots, valid):
                mark(t, 0)
        mark(slots, 1)
        mark(valid, 1)
