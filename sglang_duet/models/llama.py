"""The Llama family written once: Llama 2/3 (incl. llama3 RoPE scaling), SmolLM2, Mistral
(without sliding window), Qwen2 (QKV bias) and Qwen3 (QK-norm).

Numerics follow transformers step for step (RMSNorm in float32 then cast back, RoPE with
float32 inv_freq and the rotate_half layout, cos/sin cast to the activation dtype) so that
greedy decoding is token-exact against `generate(do_sample=False)` in float32.

On a CUDA device the norms, residual adds, QK-norm + RoPE and SiLU * up run as fused Triton kernels
(kernels/fused_ops.py, the same math; SGLANG_DUET_TORCH_OPS=1 keeps these torch ops for an A/B).

Module names mirror HF (`model.layers.N.self_attn.q_proj`, ...) so that safetensors load
by name. Tokens of all requests are flattened into one [T, hidden] batch; attention is
delegated to an AttentionBackend that reads/writes the KV pool.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sglang_duet.distributed.parallel_state import SINGLE, TPGroup
from sglang_duet.distributed.sharding import ShardSpec, TPLayout, shard_tensor
from sglang_duet.kernels.attention.base import AttentionBackend, ForwardBatch
from sglang_duet.kernels.fused_ops import FusedOps, resolve, rmsnorm_ref, rotate_half
from sglang_duet.models.config import ModelConfig
from sglang_duet.models.cpu_weights import NO_PACKED_ROWS, CpuWeightFormsMixin, linear_rows, lm_head_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_ref(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """float32 inverse frequencies, same formula (and rounding) as transformers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"Unsupported rope scaling {kind!r}")


def row_parallel(linear: nn.Linear, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """A row-parallel linear: partial products summed over the ranks (one all-reduce), the
    replicated bias added once afterwards. Size 1 is the plain nn.Linear, bit for bit."""
    if tp.size == 1:
        return linear(x)
    y = tp.all_reduce(F.linear(x, linear.weight))
    return y if linear.bias is None else y + linear.bias


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads only), row-parallel o_proj."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        layout = TPLayout.of(cfg, tp.rank, tp.size)
        self.tp = tp
        self.layer_id = layer_id
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.head_dim = cfg.head_dim
        # Qwen2 hard-codes bias on q/k/v and none on o; Llama/Qwen3 use attention_bias for all four.
        qkv_bias = cfg.attention_bias or cfg.family == "qwen2"
        o_bias = cfg.attention_bias and cfg.family != "qwen2"
        h = cfg.hidden_size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, h, bias=o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim of each head, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_sizes = (q_size, kv_size, kv_size)
        # Set by fuse(): q/k/v weights concatenated (the three parameters become views of it).
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        # Set by add_gemv_weights(): [in, out] copies of the fused q/k/v and of o_proj for few-row steps;
        # by add_packed_weights(): both in oneDNN's blocked layout (models/cpu_weights.py).
        self.qkv_weight_t: torch.Tensor | None = None
        self.o_weight_t: torch.Tensor | None = None
        self.qkv_packed: torch.Tensor | None = None
        self.o_packed: torch.Tensor | None = None
        self.packed_rows = NO_PACKED_ROWS

    def fuse(self) -> None:
        """Concatenate q/k/v into one [q+2kv, hidden] weight and make the three parameters views of it:
        the same memory, one GEMM per layer instead of three (fewer passes over the activations)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = _fuse_params(projs, "weight")
        self.qkv_bias = _fuse_params(projs, "bias") if self.q_proj.bias is not None else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, kv_pool, ops: FusedOps | None = None) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv_weight is not None:  # one GEMM instead of three (fuse_projections)
            q, k, v = linear_rows(x, self.qkv_weight, self.qkv_bias, self.qkv_weight_t, self.qkv_packed,
                                  self.packed_rows).split(self.qkv_sizes, dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            v = v.view(T, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        store = None
        if ops is not None:  # QK-norm (Qwen3) and RoPE of all heads, and k/v into the pool: one kernel
            store = ops.kv_store(attn, kv_pool, self.layer_id, k, v)
            q, k = ops.qk_norm_rope(q, k, cos, sin, self.q_norm, self.k_norm, store)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        o = attn.run(self.layer_id, q, k, v, kv_pool, kv_stored=store is not None)
        if self.o_weight_t is not None or self.o_packed is not None:  # only without tensor parallelism
            return linear_rows(o, self.o_proj.weight, self.o_proj.bias, self.o_weight_t, self.o_packed, self.packed_rows)
        return row_parallel(self.o_proj, o, self.tp)


class MLP(nn.Module):
    """Column-parallel gate/up, row-parallel down."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        bias = bool(cfg.raw.get("mlp_bias", False))
        inter = TPLayout.of(cfg, tp.rank, tp.size).intermediate
        self.tp = tp
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=bias)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse()
        self.gate_up_bias: torch.Tensor | None = None
        self.gate_up_weight_t: torch.Tensor | None = None  # set by add_gemv_weights()
        self.gate_up_packed: torch.Tensor | None = None  # set by add_packed_weights(), and:
        self.down_packed: torch.Tensor | None = None
        self.packed_rows = NO_PACKED_ROWS

    def fuse(self) -> None:
        """gate and up in one [2 * inter, hidden] weight (the two parameters become views of it)."""
        projs = (self.gate_proj, self.up_proj)
        self.gate_up_weight = _fuse_params(projs, "weight")
        self.gate_up_bias = _fuse_params(projs, "bias") if self.gate_proj.bias is not None else None

    def forward(self, x: torch.Tensor, ops: FusedOps | None = None) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = linear_rows(x, self.gate_up_weight, self.gate_up_bias, self.gate_up_weight_t, self.gate_up_packed,
                                   self.packed_rows).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        h = F.silu(gate) * up if ops is None else ops.silu_mul(gate, up)
        if self.down_packed is not None:  # only without tensor parallelism
            return linear_rows(h, self.down_proj.weight, self.down_proj.bias, None, self.down_packed, self.packed_rows)
        return row_parallel(self.down_proj, h, self.tp)


def _fuse_params(modules, attr: str) -> torch.Tensor:
    """Concatenate `attr` of each module along dim 0 and re-point each module's parameter at its slice
    of the result, so later loads (p.copy_) update the fused tensor too and no memory is doubled."""
    fused = torch.cat([getattr(m, attr).detach() for m in modules], dim=0)
    _point_at_slices(modules, attr, fused)
    return fused


def _point_at_slices(modules, attr: str, fused: torch.Tensor) -> None:
    """Make each module's `attr` parameter the view of its rows of `fused` (stacked along dim 0)."""
    start = 0
    for m in modules:
        part = getattr(m, attr)
        if tuple(part.shape[1:]) != tuple(fused.shape[1:]) or part.dtype != fused.dtype:
            raise ValueError(f"fused {attr} {tuple(fused.shape)} {fused.dtype} does not stack {tuple(part.shape)} {part.dtype}")
        n = part.shape[0]
        setattr(m, attr, nn.Parameter(fused[start:start + n], requires_grad=part.requires_grad))
        start += n
    if start != fused.shape[0]:
        raise ValueError(f"fused {attr} has {fused.shape[0]} rows, its parts {start}")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn, kv_pool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_pool)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, cos, sin, attn, kv_pool, ops: FusedOps):
        """SGLang's layout: (x, residual) -> (this layer's MLP output, residual), each norm one kernel with the
        residual add before it (residual None: x is the embedding). The same sums as forward() (a + b == b + a)."""
        x, residual = ops.add_norm(x, residual, self.input_layernorm)
        x = self.self_attn(x, cos, sin, attn, kv_pool, ops)
        x, residual = ops.add_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(x, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        vocab = TPLayout.of(cfg, tp.rank, tp.size).vocab_per_rank
        # _weight: no random init. Under the loader's meta device, Embedding's own normal_ init imports
        # torch._dynamo (~2 s of every start-up); the loader overwrites the weights anyway.
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CpuWeightFormsMixin, nn.Module):
    # Names present in some checkpoints that carry no weights of ours.
    _IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.layout = TPLayout.of(config, tp.rank, tp.size)
        #: set on the driver rank of a TP group: called with each batch before the forward runs, so
        #: the follower ranks run the same forward (see sglang_duet.distributed.tp_worker)
        self.step_broadcaster = None
        act = config.raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Unsupported hidden_act {act!r} (only silu)")
        if config.raw.get("use_sliding_window"):
            raise ValueError("Sliding-window attention is not supported")
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, tp)
        # Tied embeddings: no lm_head module at all, forward reads embed_tokens.weight.
        # (Avoids a shared Parameter, which meta-device init + to_empty would silently untie.)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, self.layout.vocab_per_rank, bias=False))
        self._inv_freq_cpu = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self._inv_freq: torch.Tensor | None = None
        self.lm_head_weight_t: torch.Tensor | None = None  # set by add_gemv_weights()
        self.lm_head_packed: torch.Tensor | None = None  # set by add_packed_weights()
        self.packed_rows = NO_PACKED_ROWS
        #: the fused Triton layer ops (kernels/fused_ops.py): None decides by device (CUDA and Triton, unless
        #: SGLANG_DUET_TORCH_OPS=1), True forces them (a CPU under TRITON_INTERPRET=1: tests), False never
        self.use_fused_ops: bool | None = None

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up of every layer (one GEMM each). Call after the weights are loaded and
        the model is on its device; the parameters stay (as views), so load_weights still works."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    # ---- serving layout (model_loader/prepared.py maps these from one file) ------------------------
    _FUSED = (("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up", ("gate_proj", "up_proj")))

    def serving_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the forward reads, by name, after fuse_projections(): the fused q/k/v and gate/up
        weights (`...self_attn.qkv_weight`, `...mlp.gate_up_weight`, and biases) instead of the
        parameters that are views of them, and every other parameter as it is."""
        out: dict[str, torch.Tensor] = {}
        views: set[int] = set()
        for i, layer in enumerate(self.model.layers):
            for sub, fused_name, parts in self._FUSED:
                block = getattr(layer, sub)
                for attr in ("weight", "bias"):
                    t = getattr(block, f"{fused_name}_{attr}")
                    if t is None:
                        continue
                    out[f"model.layers.{i}.{sub}.{fused_name}_{attr}"] = t.detach()
                    views.update(id(getattr(getattr(block, p), attr)) for p in parts)
        if not out:
            raise ValueError("serving_tensors() needs the fused projections (fuse_projections())")
        for name, p in self.named_parameters():
            if id(p) not in views:
                out[name] = p.detach()
        for owner, attr, _, name in self._gemv_slots():  # the few-row copies, when the model has them
            if getattr(owner, attr) is not None:
                out[name] = getattr(owner, attr)
        return out

    def adopt_serving_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of serving_tensors(): the model's parameters become these tensors themselves
        (no copy; e.g. views of a mapped file), fused ones with their parts as views. Strict: every
        parameter must be covered, with its shape and dtype."""
        tensors = dict(tensors)
        gemv = {name: tensors.pop(name) for _, _, _, name in self._gemv_slots() if name in tensors}
        for i, layer in enumerate(self.model.layers):
            for sub, fused_name, parts in self._FUSED:
                block = getattr(layer, sub)
                modules = [getattr(block, p) for p in parts]
                for attr in ("weight", "bias"):
                    if getattr(modules[0], attr) is None:
                        continue
                    name = f"model.layers.{i}.{sub}.{fused_name}_{attr}"
                    if name not in tensors:
                        raise ValueError(f"serving tensors lack {name}")
                    fused = tensors.pop(name)
                    _point_at_slices(modules, attr, fused)
                    setattr(block, f"{fused_name}_{attr}", fused)
        fused_parts = {f"model.layers.{i}.{sub}.{p}.{attr}" for i in range(len(self.model.layers))
                       for sub, _, parts in self._FUSED for p in parts for attr in ("weight", "bias")}
        for name, p in list(self.named_parameters()):
            if name in fused_parts:
                continue
            t = tensors.pop(name, None)
            if t is None:
                raise ValueError(f"serving tensors lack {name}")
            if tuple(t.shape) != tuple(p.shape) or t.dtype != self.dtype:
                raise ValueError(f"serving tensor {name}: {tuple(t.shape)} {t.dtype}, model {tuple(p.shape)} {self.dtype}")
            module_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module_name), attr, nn.Parameter(t, requires_grad=p.requires_grad))
        if tensors:
            raise ValueError(f"unexpected serving tensors {sorted(tensors)[:8]}")
        if gemv:  # all or none: a few-row step multiplies with every copy
            for owner, attr, w, name in self._gemv_slots():
                t = gemv.get(name)
                if t is None or tuple(t.shape) != tuple(reversed(w.shape)) or t.dtype != self.dtype:
                    raise ValueError(f"serving tensor {name}: missing or not the transpose of {tuple(w.shape)} {self.dtype}")
                setattr(owner, attr, t)

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, head_dim] (broadcast over heads) in the activation dtype."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq_cpu.to(positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @torch.no_grad()
    def forward(self, fb: ForwardBatch, attn: AttentionBackend, kv_pool, planned: bool = False) -> torch.Tensor:
        """Logits [len(fb.sample_indices), vocab] in float32.

        Calls attn.plan(fb) unless the caller already did (planned=True), e.g. an executor
        that plans outside a captured CUDA graph.
        """
        if self.step_broadcaster is not None:
            with self.step_broadcaster(fb):
                return self._forward(fb, attn, kv_pool, planned)
        return self._forward(fb, attn, kv_pool, planned)

    def _forward(self, fb: ForwardBatch, attn: AttentionBackend, kv_pool, planned: bool) -> torch.Tensor:
        if not planned:
            attn.plan(fb)
        x = self.embed(fb.input_ids)
        cos, sin = self.rope_cos_sin(fb.positions, x.dtype)
        ops = resolve(x.device, self.use_fused_ops)
        if ops is not None:
            residual = None
            for layer in self.model.layers:
                x, residual = layer.forward_fused(x, residual, cos, sin, attn, kv_pool, ops)
            idx = fb.sample_indices  # the final norm too only for the rows we sample from
            return self._lm_head(ops.add_norm(x[idx], residual[idx], self.model.norm)[0])
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn, kv_pool)
        return self.compute_logits(x, fb.sample_indices)

    def compute_logits(self, x: torch.Tensor, sample_indices: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the rows `sample_indices` of the last layer's output x."""
        # RMSNorm and lm_head are per-token: only the rows we sample from need them.
        return self._lm_head(self.model.norm(x[sample_indices]))

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final-normed rows x."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp.size == 1:
            return lm_head_rows(x, w, self.lm_head_weight_t, self.lm_head_packed, self.packed_rows).float()
        # vocab-parallel LM head: each rank scores its slice of the vocabulary; gather, drop padding
        logits = self.tp.all_gather_last_dim(F.linear(x, w).float())
        return logits[:, :self.config.vocab_size]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: a rank looks up the ids in its slice and zeros the rest; the
        all-reduce adds exact zeros, so the result equals the unsharded lookup bit for bit."""
        if self.tp.size == 1:
            return self.model.embed_tokens(ids)
        start = self.layout.vocab_start
        local = ids - start
        mine = (local >= 0) & (local < self.layout.vocab_per_rank)
        x = self.model.embed_tokens(torch.where(mine, local, torch.zeros_like(local)))
        x = x * mine.unsqueeze(-1).to(x.dtype)
        return self.tp.all_reduce(x)

    def weight_shard(self, name: str) -> ShardSpec | None:
        """The slice of checkpoint tensor `name` this rank holds (None: the whole tensor)."""
        return self.layout.spec(name, self.config.head_dim)

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (HF name, tensor) pairs into the parameters; strict about missing/extra names. The few-row
        copies (add_gemv_weights) would go stale: they are dropped (the loader makes them afterwards)."""
        self.drop_gemv_weights()
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            if name.endswith(self._IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # some tied checkpoints still store a copy
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            if (self.tp.size > 1 and name.endswith(("embed_tokens.weight", "lm_head.weight"))
                    and tensor.shape[0] < p.shape[0] and tuple(tensor.shape[1:]) == tuple(p.shape[1:])):
                # the last vocab-parallel shard: rows past the vocabulary are zero padding
                with torch.no_grad():
                    p.zero_()
                    p[:tensor.shape[0]].copy_(tensor.to(device=p.device, dtype=p.dtype))
                loaded.add(name)
                continue
            if tuple(p.shape) != tuple(tensor.shape):
                raise ValueError(f"Shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(tensor.to(device=p.device, dtype=p.dtype))
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if unexpected or missing:
            raise ValueError(f"Checkpoint does not match the model: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{'...' if len(unexpected) > 8 else ''}")

    def init_dummy_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Deterministic random weights: N(0, std) matrices, ones for norms, zeros for biases.

        The generator lives on the parameters' device, so values are reproducible per device
        without materialising multi-GB tensors on the host. A tensor-parallel rank draws each
        whole tensor (one at a time) and keeps its slice, so every --tp-size gets the same model.
        """
        dev = next(self.parameters()).device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        if self.tp.size > 1:
            self.load_weights(self._dummy_shards(gen, std, dev))
            return
        with torch.no_grad():
            for name, p in self.named_parameters():
                _fill_dummy(name, p, gen, std)

    def _dummy_shards(self, gen: torch.Generator, std: float, dev: torch.device):
        with torch.device("meta"):
            whole = LlamaForCausalLM(self.config, self.dtype)
        for name, meta in whole.named_parameters():
            t = _fill_dummy(name, torch.empty(meta.shape, dtype=self.dtype, device=dev), gen, std)
            yield name, shard_tensor(t, self.weight_shard(name))


def _fill_dummy(name: str, t: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """Parameter `name`'s dummy value, in place: ones for norms, zeros for biases, else N(0, std) from gen."""
    if name.endswith("norm.weight"):
        return t.fill_(1.0)
    if name.endswith(".bias"):
        return t.zero_()
    return t.normal_(0.0, std, generator=gen)
