"""Products with a small float32 or bf16 model's weights on a CPU, by the row count of the step (issue 18).

One weight, up to three forms, each the fastest somewhere (SmolLM2-135M's shapes on the 2-core AVX2 EPYC
test machine, torch 2.13.0+cpu, microseconds per product; `benchmark/results/cpu_decode-cpu2.md`):

  * as nn.Linear keeps it, [out, in]: MKL's GEMM (F.linear). The best from ~128 rows (prefill chunks):
    oneDNN's blocked GEMM below is 8-13% slower there, at one thread and at two.
  * an [in, out] copy (x @ w_t), mapped from the serving file (model_loader/prepared.py): MKL's axpy-style
    gemv. For ONE row MKL's [out, in] dot-product gemv streamed the weights at 13-14 GB/s, the copy at
    18-24 GB/s (LM head 8.8 -> 4.8 ms at one thread); at 2 and 3 rows MKL's [out, in] path makes about
    one more pass over the weights per row (q/k/v + o + gate/up of 30 layers plus the LM head 76 / 101 ms
    against 39 / 53 ms with the copies). down_proj (in > out) gains nothing and has no copy.
  * oneDNN's blocked ("prepacked") layout (torch.ops.mkldnn._reorder_linear_weight): private to the process
    (an opaque tensor, not mappable), as vLLM's CPU build multiplies its weights (onednn_mm). From 2 rows it
    beats both MKL forms, most of all with two threads, where MKL's small-row GEMM hardly parallelises:
      rows            2        4        16       64
      gate_up  1 thr  325/203  450/314  919/819  2721/2897   ([out, in] / blocked)
               2 thr  326/120  456/189  697/447  2132/1442
      LM head  1 thr  16933/6891  18085/8717  26615/17516  58842/49820
               2 thr  18358/3672  18107/4526  23373/8917   39970/25470

Those are single products, the weights in cache. In a step, the weights stream from memory, and the
ranking moves (PackedRows.for_threads): a small float32 model on a CPU multiplies with the blocked weights
from one row (two threads or more; from two rows at one thread, where the copies serve one-row steps) up to
128 rows (32 at one thread), the LM head, which sees only the sampled rows, at every count from there, and
with MKL's GEMM above. Bigger models would pay too much memory (GEMV_COPY_MAX_BYTES each form).
A bf16 model (on a CPU with native bf16) has no copies and multiplies every step with its blocked weights
(PackedRows.for_model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Models whose copies (and whose blocked weights) take more bytes than this get neither.
GEMV_COPY_MAX_BYTES = 1 << 30
# Steps of up to this many rows multiply with the [in, out] copies when the model has no blocked weights
# (with them, only one-row steps do: see the module's table).
GEMV_MAX_ROWS = 3
# Without blocked weights, the LM head on a CPU runs as GEMMs over this many vocabulary rows at a time: for
# a few rows one MKL GEMM over SmolLM2's 49152 x 576 head ran 15-25% slower than 1024-row pieces (one AVX2
# core: 28.8 vs 22.6 ms at 16 rows, CPU time), and every logit is the same dot product, bit for bit.
LM_HEAD_CPU_ROWS = 1024


@dataclass(frozen=True)
class PackedRows:
    """The row counts whose products run against the blocked weights (`rows in packed_rows`)."""

    lo: int
    hi: int

    def __contains__(self, rows: int) -> bool:
        return self.lo <= rows <= self.hi

    @classmethod
    def for_model(cls, dtype: torch.dtype, threads: int) -> "PackedRows":
        """bf16 (a CPU with native bf16 only: model_loader): the blocked weights at every row count. On the
        2-core AVX512-BF16 EPYC (Zen 4) test machine, 30 layers' gate_up products streamed from memory ran
        1.7-2.4x faster blocked than torch's own bf16 GEMM from 1 to 16 rows, 1.2-1.3x at 64-128 and still
        1.05-1.08x at 512, at one thread and at two; there are no [in, out] copies in bf16.
        float32: for_threads."""
        return cls(1, 1 << 62) if dtype == torch.bfloat16 else cls.for_threads(threads)

    @classmethod
    def for_threads(cls, threads: int) -> "PackedRows":
        """Measured with weights streamed from memory (30 layers' worth, as in a step): at one thread the
        copies win one-row products (22.1 vs 25.9 ms for the layers) and the blocked GEMM is even with
        MKL's up to ~32 rows, 3-8% slower at 64; at two threads the blocked weights win from one row (18.1
        vs 22.3 ms: MKL's gemv runs on one thread) and are 1.5x faster at 64 rows, 1.07x at 128, 0.92x at 512."""
        return cls(1, 128) if threads >= 2 else cls(2, 32)

    def for_lm_head(self) -> "PackedRows":
        """The LM head sees only the sampled rows: blocked from the same first row count, with no top."""
        return PackedRows(self.lo, 1 << 62)


NO_PACKED_ROWS = PackedRows(1, 0)

# The dtypes whose weights get a blocked form (PackedRows.for_model)
PACKED_DTYPES = (torch.float32, torch.bfloat16)

# The forms of a weight a product multiplies with
PLAIN, COPIES, PACKED = "plain", "copies", "packed"


def product_form(rows: int, packed_rows: PackedRows, copies: bool) -> str:
    """The form a product of `rows` rows multiplies with: the blocked weights for `packed_rows`, else the
    [in, out] copies (if there are any) up to GEMV_MAX_ROWS rows, else the [out, in] weights. The one rule of
    the eager products (linear_rows) and the compiled decode layer (models/decode_step.py)."""
    if rows in packed_rows:
        return PACKED
    if copies and rows <= GEMV_MAX_ROWS:
        return COPIES
    return PLAIN


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(w: torch.Tensor) -> torch.Tensor:
    """w ([out, in], float32) in oneDNN's blocked layout, for x [rows, in] -> [rows, out] products. The
    batch-size hint only picks the block shape; 16 measured as fast as 1 or 64 at every row count."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 16)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def transposed(w: torch.Tensor) -> torch.Tensor:
    return w.detach().t().contiguous()


def _chunked_linear(x: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([F.linear(x, w[s:s + rows]) for s in range(0, w.shape[0], rows)], dim=1)


def linear_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_t: torch.Tensor | None = None,
                packed: torch.Tensor | None = None, packed_rows: PackedRows = NO_PACKED_ROWS) -> torch.Tensor:
    """F.linear(x, w, b), computed against the form that is fastest for x's row count: the blocked weight
    `packed` for `packed_rows`, else the [in, out] copy w_t up to GEMV_MAX_ROWS rows, else w itself. The
    same products summed in another order: last-bit differences."""
    form = product_form(x.shape[0], packed_rows if packed is not None else NO_PACKED_ROWS, w_t is not None)
    if form == PACKED:
        return packed_linear(x, packed, b)
    if form == COPIES:
        return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)
    return F.linear(x, w, b)


def lm_head_rows(x: torch.Tensor, w: torch.Tensor, w_t: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None, packed_rows: PackedRows = NO_PACKED_ROWS) -> torch.Tensor:
    """Logits x @ w.T (not yet float32) of one rank's whole vocabulary."""
    rows, head_rows = x.shape[0], packed_rows.for_lm_head()
    if product_form(rows, head_rows if packed is not None else NO_PACKED_ROWS, w_t is not None) != PLAIN:
        return linear_rows(x, w, None, w_t, packed, head_rows)
    if x.device.type == "cpu" and rows > 1 and w.shape[0] > LM_HEAD_CPU_ROWS:
        return _chunked_linear(x, w, LM_HEAD_CPU_ROWS)
    return F.linear(x, w)


class CpuWeightFormsMixin:
    """LlamaForCausalLM's second and third forms of its weights: the [in, out] copies (in the serving file
    for the embedded model) and the blocked weights (process-private). Reads the model's `model.layers`,
    `lm_head`, `dtype` and `tp`; each layer's attention and MLP hold their forms as attributes
    (`qkv_weight_t`, `qkv_packed`, ..., and `packed_rows`)."""

    def _gemv_slots(self):
        """(owner, attribute, the [out, in] weight it transposes, serving name) of every few-row copy."""
        out = []
        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            out.append((a, "qkv_weight_t", a.qkv_weight, f"model.layers.{i}.self_attn.qkv_weight_t"))
            out.append((a, "o_weight_t", a.o_proj.weight, f"model.layers.{i}.self_attn.o_weight_t"))
            out.append((m, "gate_up_weight_t", m.gate_up_weight, f"model.layers.{i}.mlp.gate_up_weight_t"))
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        out.append((self, "lm_head_weight_t", head, "lm_head_weight_t"))
        return out

    def gemv_copy_bytes(self) -> int:
        """Bytes the few-row copies take (0 where they do not apply: see wants_gemv_weights)."""
        return sum(w.numel() * w.element_size() for _, _, w, _ in self._gemv_slots() if w is not None)

    def wants_gemv_weights(self, device: torch.device) -> bool:
        """Whether this model gets the few-row copies: fused, float32, on a CPU, one rank, and the copies
        under GEMV_COPY_MAX_BYTES (the gain was measured there; elsewhere it costs memory for nothing known)."""
        return self.dtype == torch.float32 and self._small_fused_cpu_model(device)

    def _small_fused_cpu_model(self, device: torch.device) -> bool:
        """On a CPU, one rank, q/k/v fused, and one more form of its weights under GEMV_COPY_MAX_BYTES."""
        return (torch.device(device).type == "cpu" and self.tp.size == 1
                and self.model.layers[0].self_attn.qkv_weight is not None
                and self.gemv_copy_bytes() <= GEMV_COPY_MAX_BYTES)

    def add_gemv_weights(self) -> None:
        """Make the [in, out] copies that steps of up to GEMV_MAX_ROWS rows multiply with (after the weights are final)."""
        for owner, attr, w, _ in self._gemv_slots():
            setattr(owner, attr, transposed(w))

    def drop_gemv_weights(self) -> None:
        """Drop the few-row copies and the blocked weights (both stale once the weights change)."""
        for owner, attr, _, _ in self._gemv_slots():
            setattr(owner, attr, None)
        self.drop_packed_weights()

    @property
    def has_gemv_weights(self) -> bool:
        return self.lm_head_weight_t is not None

    def _packed_slots(self):
        """(owner, attribute, the [out, in] weight it packs) of every blocked weight."""
        out = []
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            out += [(a, "qkv_packed", a.qkv_weight), (a, "o_packed", a.o_proj.weight),
                    (m, "gate_up_packed", m.gate_up_weight), (m, "down_packed", m.down_proj.weight)]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return out + [(self, "lm_head_packed", head)]

    def wants_packed_weights(self, device: torch.device) -> bool:
        """Whether this model gets blocked weights: a small fused float32 or bf16 model on a CPU, one rank
        (as for the copies, whatever the dtype), and torch has oneDNN. They are process-private memory, the
        model's size again. (The loader packs bf16 only where the CPU has native bf16.)"""
        return (self.dtype in PACKED_DTYPES and self._small_fused_cpu_model(device)
                and onednn_available())

    def add_packed_weights(self, threads: int | None = None) -> None:
        """Pack every weight in oneDNN's blocked layout (after the weights are final), used for the row counts
        PackedRows.for_model gives, `threads` the model's torch threads (default: now)."""
        rows = PackedRows.for_model(self.dtype, torch.get_num_threads() if threads is None else threads)
        for owner, attr, w in self._packed_slots():
            setattr(owner, attr, pack(w))
        self._set_packed_rows(rows)

    def drop_packed_weights(self) -> None:
        for owner, attr, _ in self._packed_slots():
            setattr(owner, attr, None)
        self._set_packed_rows(NO_PACKED_ROWS)

    def _set_packed_rows(self, rows: PackedRows) -> None:
        for module in (self, *(m for layer in self.model.layers for m in (layer.self_attn, layer.mlp))):
            module.packed_rows = rows

    @property
    def has_packed_weights(self) -> bool:
        return self.lm_head_packed is not None

