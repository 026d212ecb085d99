"""The CPU decode step compiled with torch.compile (inductor's C++ backend): `--enable-torch-compile`.

What it compiles: ONE decoder layer as a function of (activations, the layer's weights, its K/V
buffers, the step's slot table). Every layer of the model runs the same compiled code with its own
weights, so the compile cost is one layer's, not the model's (a whole-model graph of 30 layers took
minutes on a 2-core machine). Batch size and context length are dynamic dimensions: one compile serves
every decode batch in its range. The GEMMs multiply with the form of the weights the eager model
would use at that row count (models/cpu_weights.py): oneDNN's blocked weights (through a custom op that
inductor leaves as an extern call: its own lowering of the blocked linear wants frozen weights), the
[in, out] copies, or the [out, in] weights; each form is its own layer function, compiled for one
request, for a batch, and for a batch with prefill chunks, so start-up compiles three or four graphs.

Why it is faster than the eager layer:
  * attention reads the paged KV pool in place: `k_buf[slots]` is fused by inductor into the score
    and output reductions, so the per-step gather (and the transposed copies) of the whole context
    of every request are never materialised;
  * RMSNorm, RoPE, the residual adds, SiLU * up and the softmax are fused loops instead of ~20
    separate ops per layer (each its own pass over memory and its own Python dispatch).
The GEMMs stay extern calls (the same oneDNN / BLAS calls the eager path makes).

Decode batches (one new token per request) take this path, and so do chunked prefill's mixed steps: 2+
decodes next to prefill chunks, whose rows go last and attend through one SDPA call (CPU kernel) over K/V
gathered from the pool (`chunk_attention`); the GEMMs then multiply every row at once. In a 2-core bf16
step of 15 decodes and a 64-token chunk that took 89 -> 80 ms (the GEMMs ~52 of it). Steps with fewer
than two decodes (a prefill) run the eager model (`step_kind`). The executor compiles at start-up
(`warm_up`), so no request waits for the compiler. It is refused (eager runs, a warning says why) when
the model is tensor-parallel, not on a CPU, when no C++ compiler is found, or when compiling or running
the compiled step raises.
Numerics: the same formulas as the eager layer (float32 RMSNorm and softmax); inductor's reductions
sum in a different order, so logits differ from eager in the last bits (tests bound the difference
and check greedy tokens).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import PADDING_SLOT
from sglang_duet.models.cpu_weights import COPIES, NO_PACKED_ROWS, PACKED, PLAIN, packed_linear, product_form

logger = logging.getLogger(__name__)


@torch.library.custom_op("sglang_duet::cpu_packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """models/cpu_weights.packed_linear as an op inductor calls as it is (an opaque blocked weight)."""
    return packed_linear(x, packed, bias)


@_packed_linear_op.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else g++/c++/clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def decode_slot_table(fb: ForwardBatch, requests: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [b, L] long (row i: the KV slots of request i's positions, padded with the padding slot)
    and valid [b, L] bool (position < seq_len), L = the longest sequence, from the batch's flat
    kv_indices without a per-request Python loop; of every request, or of `requests` (batch indices)."""
    seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
    lens, starts = fb.seq_lens.to(torch.long), fb.kv_indptr[:-1].to(torch.long)
    if requests is not None:
        seq = [seq[i] for i in requests]
        pick = torch.tensor(requests, dtype=torch.long, device=fb.device)
        lens, starts = lens[pick], starts[pick]
    width = max(seq)
    cols = torch.arange(width, device=fb.device)
    valid = cols[None, :] < lens[:, None]
    idx = starts[:, None] + cols[None, :]
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


def chunk_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """The new tokens of one or more requests' chunks over their cached prefixes and themselves: q [n, H, D],
    slots [L] (each request's KV slots in position order, the new tokens' included, one request after the
    other), mask [n, L] bool (MixedInputs.chunk_mask) -> [n, H * D]. SDPA's CPU kernel (inductor calls it
    as it is) on K/V gathered from the pool, the n_rep query heads of each KV head stacked as its query rows
    ([1, H_kv, n_rep * n, D], the mask repeated to match): GQA without a repeated copy of K/V."""
    n, H, D = q.shape
    hkv = k_buf.shape[1]
    rep = H // hkv
    k = k_buf[slots].permute(1, 0, 2)[None]  # [1, H_kv, L, D]
    v = v_buf[slots].permute(1, 0, 2)[None]
    qg = q.view(n, hkv, rep, D).permute(1, 2, 0, 3).reshape(1, hkv, rep * n, D)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(rep, 1)[None, None])
    return o.view(hkv, rep, n, D).permute(2, 0, 1, 3).reshape(n, H * D)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w_t (+ b) against an [in, out] weight: models/cpu_weights.py's few-row product (linear_rows)."""
    return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)


def make_decode_layer(num_heads: int, num_kv_heads: int, head_dim: int, eps: float, form: str = PLAIN,
                      hidden: int = 0, intermediate: int = 0):
    """The decoder layer of models/llama.py as one function (the ints are constants of its graph), its
    q/k/v, o, gate/up and down products against the weights in `form`:
      PLAIN   the [out, in] weights (F.linear);
      COPIES  the [in, out] copies of q/k/v, o and gate/up (x @ w_t), down_proj [out, in];
      PACKED  oneDNN's blocked weights of all four (hidden and intermediate: their output sizes).
    Each form is its own function (its own code object), so torch.compile keeps their graphs apart."""
    H, hkv, D = num_heads, num_kv_heads, head_dim
    qkv_out = (H + 2 * hkv) * D

    def attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf, chunk_slots, chunk_mask):
        T = x.shape[0]
        q, k, v = qkv.split([H * D, hkv * D, hkv * D], dim=-1)
        q, k, v = q.view(T, H, D), k.view(T, hkv, D), v.view(T, hkv, D)
        if q_norm is not None:
            q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_buf.index_copy_(0, loc, k.to(k_buf.dtype))
        v_buf.index_copy_(0, loc, v.to(v_buf.dtype))
        if chunk_slots is None:
            return paged_decode_attention(q, k_buf, v_buf, slots, valid).reshape(T, H * D)
        # a mixed step: the decode rows first (one query each over the paged pool), then the chunks' rows
        nd = slots.shape[0]
        decoded = paged_decode_attention(q[:nd], k_buf, v_buf, slots, valid).reshape(nd, H * D)
        return torch.cat([decoded, chunk_attention(q[nd:], k_buf, v_buf, chunk_slots, chunk_mask)])

    def decode_layer(x, cos, sin, loc, slots, valid, ln1, w_qkv, b_qkv, q_norm, k_norm, w_o, b_o,
                     ln2, w_gate_up, b_gate_up, w_down, b_down, k_buf, v_buf,
                     chunk_slots=None, chunk_mask=None):
        qkv = F.linear(_rms_norm(x, ln1, eps), w_qkv, b_qkv)
        o = attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf, chunk_slots, chunk_mask)
        x = x + F.linear(o, w_o, b_o)
        gate, up = F.linear(_rms_norm(x, ln2, eps), w_gate_up, b_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w_down, b_down)

    def decode_layer_copies(x, cos, sin, loc, slots, valid, ln1, w_qkv_t, b_qkv, q_norm, k_norm, w_o_t, b_o,
                            ln2, w_gate_up_t, b_gate_up, w_down, b_down, k_buf, v_buf,
                            chunk_slots=None, chunk_mask=None):
        qkv = _linear_t(_rms_norm(x, ln1, eps), w_qkv_t, b_qkv)
        o = attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf, chunk_slots, chunk_mask)
        x = x + _linear_t(o, w_o_t, b_o)
        gate, up = _linear_t(_rms_norm(x, ln2, eps), w_gate_up_t, b_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w_down, b_down)  # down_proj: no copy (models/cpu_weights.py)

    def decode_layer_packed(x, cos, sin, loc, slots, valid, ln1, p_qkv, b_qkv, q_norm, k_norm, p_o, b_o,
                            ln2, p_gate_up, b_gate_up, p_down, b_down, k_buf, v_buf,
                            chunk_slots=None, chunk_mask=None):
        mm = _packed_linear_op
        qkv = mm(_rms_norm(x, ln1, eps), p_qkv, b_qkv, qkv_out)
        o = attention_block(x, cos, sin, loc, slots, valid, qkv, q_norm, k_norm, k_buf, v_buf, chunk_slots, chunk_mask)
        x = x + mm(o, p_o, b_o, hidden)
        gate, up = mm(_rms_norm(x, ln2, eps), p_gate_up, b_gate_up, 2 * intermediate).chunk(2, dim=-1)
        return x + mm(F.silu(gate) * up, p_down, b_down, hidden)

    return {PLAIN: decode_layer, COPIES: decode_layer_copies, PACKED: decode_layer_packed}[form]


def _layer_weights(layer, form: str = PLAIN) -> tuple:
    """The layer's tensors in make_decode_layer's order, its four weights in `form`."""
    a, m = layer.self_attn, layer.mlp
    if a.qkv_weight is None or m.gate_up_weight is None:
        a.fuse()
        m.fuse()
    w_qkv, w_o, w_gate_up, w_down = {
        PLAIN: (a.qkv_weight, a.o_proj.weight, m.gate_up_weight, m.down_proj.weight),
        COPIES: (a.qkv_weight_t, a.o_weight_t, m.gate_up_weight_t, m.down_proj.weight),
        PACKED: (a.qkv_packed, a.o_packed, m.gate_up_packed, m.down_packed),
    }[form]
    return (layer.input_layernorm.weight, w_qkv, a.qkv_bias,
            a.q_norm.weight if a.q_norm is not None else None, a.k_norm.weight if a.k_norm is not None else None,
            w_o, a.o_proj.bias, layer.post_attention_layernorm.weight,
            w_gate_up, m.gate_up_bias, w_down, m.down_proj.bias)


#: the kinds of step the compiled layer runs, each its own graph per weight form
ONE, BATCH, MIXED = "one", "batch", "mixed"


#: a MIXED step's chunks attend as one SDPA call over all their keys (block-diagonal mask), computing scores the
#: mask throws away: at most this many times the (query, key) pairs they need, or at most
#: MIXED_ATTENTION_SPARE_PAIRS more (~0.1 ms a layer: less than running the step eagerly costs, ~10 ms at 2
#: threads); else the eager model runs the step (one SDPA call per chunk)
MIXED_ATTENTION_WASTE = 2.0
MIXED_ATTENTION_SPARE_PAIRS = 1 << 15
#: ...and only while the chunks need at most this many (query, key) pairs: past it the eager model's SDPA,
#: causal without a mask for a fresh prompt, wins (bf16 on 2 cores, 15 decodes beside a fresh chunk of n
#: tokens, compiled / eager: n 512 479 / 527 ms, 1024 (2 decodes) 1314 / 1123; 256 after 1024 cached 400 / 389)
MIXED_MAX_CHUNK_PAIRS = 1 << 18


def step_kind(fb: ForwardBatch) -> tuple[str, list[int]] | None:
    """(kind, chunks) of a batch the compiled layer runs, None for any other (the eager model runs it):
    ONE (one request adding one token), BATCH (2+ requests adding one token each), or MIXED: 2+ requests
    adding one token each and the requests at batch indices `chunks` adding 2+ (prefill chunks next to the
    decodes: chunked prefill's usual step, where a budget's tail often starts the next prompt), as long as
    one attention call over all the chunks' keys wastes little (MIXED_ATTENTION_WASTE) and their attention
    is small (MIXED_MAX_CHUNK_PAIRS). Fewer than two decodes (a prefill, or its first chunks) run eagerly."""
    ext = fb.extend_lens_cpu or fb.qo_indptr.diff().tolist()
    chunks = [i for i, n in enumerate(ext) if n > 1]
    if not chunks:
        return (ONE, []) if len(ext) == 1 else (BATCH, [])
    if len(ext) - len(chunks) < 2:
        return None
    seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
    need = sum(ext[i] * seq[i] for i in chunks)
    if need > MIXED_MAX_CHUNK_PAIRS:
        return None
    if len(chunks) > 1:
        spare = sum(ext[i] for i in chunks) * sum(seq[i] for i in chunks) - need
        if spare > max((MIXED_ATTENTION_WASTE - 1) * need, MIXED_ATTENTION_SPARE_PAIRS):
            return None
    return MIXED, chunks


@dataclass
class MixedInputs:
    """What a MIXED step adds to a decode batch's inputs; the decode rows go first, then each chunk's rows."""

    rows: torch.Tensor | None  # [T] the batch's rows in the step's order (None: the decode rows already lead)
    decodes: list[int]  # batch indices of the one-token requests, in order
    chunk_slots: torch.Tensor  # [sum L] KV slots of each chunk's request (L = p + n of it), one after the other
    chunk_mask: torch.Tensor  # [sum n, sum L] bool: a chunk's new token j (position p + j) sees its own
    #                           request's keys at positions <= p + j, and no other's

    @classmethod
    def of(cls, fb: ForwardBatch, chunks: list[int]) -> "MixedInputs":
        ext = fb.extend_lens_cpu or fb.qo_indptr.diff().tolist()
        seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
        dev = fb.device
        starts = list(accumulate(ext, initial=0))
        is_chunk = set(chunks)
        decodes = [i for i in range(len(ext)) if i not in is_chunk]
        order = decodes + chunks
        rows = None
        if order != sorted(order):
            rows = torch.tensor([r for i in order for r in range(starts[i], starts[i + 1])], dtype=torch.long,
                                device=dev)
        kv_start = list(accumulate(seq, initial=0))
        slots = torch.cat([fb.kv_indices[kv_start[i]:kv_start[i + 1]] for i in chunks])
        # per chunk row: the first and the last key column it may see
        lo, hi, col = [], [], 0
        for i in chunks:
            p = seq[i] - ext[i]
            lo += [col] * ext[i]
            hi += [col + p + j for j in range(ext[i])]
            col += seq[i]
        keys = torch.arange(col, device=dev)[None, :]
        lo_t, hi_t = (torch.tensor(v, device=dev)[:, None] for v in (lo, hi))
        return cls(rows, decodes, slots, (keys >= lo_t) & (keys <= hi_t))


class CompiledDecodeStep:
    """`step(fb)`: logits of a decode batch, or of a decode batch plus prefill chunks, through the
    compiled layer; None when the caller must run the eager model (any other batch, or the compiled path
    is off).

    A step of n rows (requests, plus the chunks' extra tokens) takes the layer function of the weight form
    the eager model would multiply with at n rows (models/cpu_weights.linear_rows): the blocked weights for
    n in the model's `packed_rows`, else the [in, out] copies for up to GEMV_MAX_ROWS requests, else the
    [out, in] weights; each compiled for one request (context dynamic), for a batch (batch dynamic too) and
    for a batch with chunks (their lengths and contexts dynamic too). With
    blocked weights, a batch past their range runs eagerly (GEMM-bound there; and no graph is compiled
    mid-traffic), as does a single request where neither the copies nor the blocked weights serve it
    (BLAS gemv beats a padded two-row GEMM). SmolLM2 at two threads (blocked weights): one request 38.9 ->
    31.0 ms per step, 16 requests 80.8 -> 72.9 ms (benchmark/results/cpu_decode-cpu2.md)."""

    def __init__(self, model, kv_pool, compile_fn=None):
        """compile_fn: how to compile the layer function (default torch.compile with dynamic batch and
        context); tests pass a failing one to check the fallback."""
        self.model = model
        self.kv_pool = kv_pool
        self.reason_off: str | None = None
        cfg = model.config
        layout = model.layout
        #: whether the model has the [in, out] copies (steps of up to GEMV_MAX_ROWS requests take them)
        self.has_copies = bool(getattr(model, "has_gemv_weights", False))
        #: requests per step that take the blocked weights' function (none without them)
        self.packed_rows = model.packed_rows if getattr(model, "has_packed_weights", False) else NO_PACKED_ROWS
        forms = [PLAIN] + [COPIES] * self.has_copies + [PACKED] * (self.packed_rows.hi > 0)
        self._layers = {f: make_decode_layer(layout.num_heads, layout.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
                                             f, cfg.hidden_size, layout.intermediate) for f in forms}
        self._compile = compile_fn or self._compile_layer
        self._compiled: dict[str, object] = {}  # by form; torch.compile keeps each one's graphs
        self._graphs: set[str] = set()  # "form/kind" (kind: one, batch, mixed) once each has run
        #: steps run through the compiled layer, by graph
        self.steps: Counter[str] = Counter()
        self._weights = {f: [_layer_weights(layer, f) for layer in model.model.layers] for f in forms}
        #: seconds the first compiled step of each graph took (compile included), summed, once they ran
        self.compile_s: float | None = None

    def form_for(self, n: int) -> str | None:
        """The weight form a decode step of n requests multiplies with (the eager products' rule); None: the
        eager model runs it (past the blocked weights' range, or a single request on the [out, in] weights)."""
        form = product_form(n, self.packed_rows, self.has_copies)
        if form == PLAIN and (self.packed_rows.hi > 0 or n == 1):
            return None
        return form

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
        from sglang_duet.model_loader.embedded import cache_root

        # inductor's compiled code in the project's cache folder (its default is under /tmp, which a reboot
        # may empty): later starts load it (~5 s) instead of compiling (~12 s on 2 cores)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root(), "inductor"))
        return cls(model, kv_pool)

    def warm_up(self) -> None:
        """Compile now (start-up), not at the first decode mid-traffic: decode steps of 4, 1 and 2 requests
        over the padding slot (every graph a batch can take), whose KV is zeroed again afterwards (it must
        stay finite and is masked wherever it is read)."""
        # batch and context of distinct sizes, so torch does not tie the two dynamic dimensions together;
        # built under inference mode like the executor's batches (else the guards differ: a second compile)
        with torch.inference_mode():
            for n in (4, 1, 2):
                self(ForwardBatch.build([([0], 2, [PADDING_SLOT] * 3, True)] * n, self.kv_pool.device))
            # mixed: 3 decodes at 4 tokens, then a 5-token chunk after 2 cached (rows 8, chunk context 7)
            decodes = [([0], 3, [PADDING_SLOT] * 4, True)] * 3
            self(ForwardBatch.build(decodes + [([0] * 5, 2, [PADDING_SLOT] * 7, True)], self.kv_pool.device))
            self.kv_pool.buffer[:, :, PADDING_SLOT].zero_()

    @property
    def active(self) -> bool:
        return self.reason_off is None

    def __call__(self, fb: ForwardBatch) -> torch.Tensor | None:
        if self.reason_off is not None:
            return None
        kind = step_kind(fb)
        if kind is None:
            return None
        form = self.form_for(fb.num_tokens)
        if form is None:
            return None
        graph = f"{form}/{kind[0]}"
        first = graph not in self._graphs
        start = time.perf_counter()
        try:
            if form not in self._compiled:
                self._compiled[form] = self._compile(self._layers[form])
            logits = self._run(fb, form, kind[1])
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure falls back to the eager model
            self.reason_off = f"{type(e).__name__}: {e}"
            logger.warning("torch.compile'd decode step failed (%s): decode runs eagerly from now on",
                           self.reason_off.splitlines()[0][:300])
            return None
        self.steps[graph] += 1
        if first:
            self._graphs.add(graph)
            took = time.perf_counter() - start
            self.compile_s = (self.compile_s or 0.0) + took
            logger.info("decode step (%s) compiled in %.1f s (first step included)", graph, took)
        return logits

    def _run(self, fb: ForwardBatch, form: str, chunks: list[int]) -> torch.Tensor:
        model = self.model
        ids, positions, loc, sample = fb.input_ids, fb.positions, fb.out_cache_loc, fb.sample_indices
        chunk_inputs: tuple = ()
        if not chunks:
            slots, valid = decode_slot_table(fb)
        else:
            mixed = MixedInputs.of(fb, chunks)
            slots, valid = decode_slot_table(fb, mixed.decodes)
            chunk_inputs = (mixed.chunk_slots, mixed.chunk_mask)
            if mixed.rows is not None:  # the step's rows in the layer's order; logits read back through it
                ids, positions, loc = ids[mixed.rows], positions[mixed.rows], loc[mixed.rows]
                order = torch.empty_like(mixed.rows)
                order[mixed.rows] = torch.arange(mixed.rows.numel(), device=order.device)
                sample = order[sample]
        x = model.embed(ids)
        cos, sin = model.rope_cos_sin(positions, x.dtype)
        self._mark_dynamic(x, cos, sin, loc, slots, valid, *chunk_inputs, batch=fb.num_tokens > 1)
        pool = self.kv_pool
        layer = self._compiled[form]
        for i, w in enumerate(self._weights[form]):
            k_buf, v_buf = pool.get_kv(i)
            x = layer(x, cos, sin, loc, slots, valid, *w, k_buf, v_buf, *chunk_inputs)
        return model.compute_logits(x, sample)

    @staticmethod
    def _mark_dynamic(x, cos, sin, loc, slots, valid, chunk_slots=None, chunk_mask=None, batch: bool = True) -> None:
        """Rows (dim 0 of all; not for one request), context (dim 1 of the slot table) and, in a mixed
        step, the chunk's length and context vary from step to step: one graph each."""
        mark = torch._dynamo.mark_dynamic
        if batch:
            for t in (x, cos, sin, loc, slots, valid):
                mark(t, 0)
        mark(slots, 1)
        mark(valid, 1)
        if chunk_slots is not None:
            mark(chunk_slots, 0)
            mark(chunk_mask, 0)
            mark(chunk_mask, 1)
