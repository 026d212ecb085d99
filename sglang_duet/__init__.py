"""sglang-duet: an LLM serving engine in SGLang's shape with pluggable scheduling policies."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "ServerArgs", "__version__"]


def __getattr__(name):
    # Lazy: importing the package (e.g. for the pure-Python core or the simulator) must not import torch.
    if name == "Engine":
        from sglang_duet.engine import Engine

        return Engine
    if name == "SamplingParams":
        from sglang_duet.sampling_params import SamplingParams

        return SamplingParams
    if name == "ServerArgs":
        from sglang_duet.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
