"""Model configuration read from an HF `config.json` (transformers 4.x and 5.x layouts).

Pure Python (no torch) so the cost model and the simulator can use it without a model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ModelConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    architecture: str
    family: str  # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v projections
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head
    dtype: str  # float32 | float16 | bfloat16 (the checkpoint's)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of K and V of one token over all layers."""
        b = dtype_bytes or self.dtype_bytes
        return 2 * self.num_hidden_layers * self.kv_size * b

    def num_params(self) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attn + 3 * h * i + norms
        emb = v * h
        lm_head = 0 if self.tie_word_embeddings else v * h
        return L * per_layer + emb + lm_head + h

    @classmethod
    def from_path(cls, path: str) -> "ModelConfig":
        """A model folder holding config.json, or a path to a config JSON file."""
        f = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(f):
            raise ModelConfigError(f"No config.json found at {path}")
        with open(f) as fh:
            d = json.load(fh)
        cfg = cls.from_dict(d)
        cfg.name = cfg.name or os.path.basename(os.path.normpath(path)).removesuffix(".json")
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            mt = d.get("model_type")
            by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
            arch = by_type.get(mt)
        if arch is None:
            raise ModelConfigError(
                f"Unsupported architecture {archs or d.get('model_type')!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _rope(d)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"  # 5.x: dtype; 4.x: torch_dtype
        if isinstance(dtype, str):
            dtype = dtype.removeprefix("torch.")
        if dtype not in _DTYPE_BYTES:
            raise ModelConfigError(f"Unsupported checkpoint dtype {dtype!r}")
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        bias = bool(d.get("attention_bias", family == "qwen2"))
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=family == "qwen3",
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=d.get("_name_or_path", "") or "",
            raw=d,
        )


def _rope(d: dict) -> tuple[float, dict | None]:
    """rope_theta (4.x top-level) or rope_parameters (5.x); never a silent default."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = d.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        raise ModelConfigError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    scaling = d.get("rope_scaling")
    if scaling is None and isinstance(params, dict):
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        rt = scaling.get("rope_type") or scaling.get("type")
        if rt in (None, "default"):
            scaling = None
        elif rt not in ("llama3", "linear"):
            raise ModelConfigError(f"Unsupported rope scaling type {rt!r} (supported: llama3, linear)")
    return float(theta), scaling
