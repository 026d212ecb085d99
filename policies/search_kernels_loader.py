"""Whether duet's compiled search can run here, and the kernels (policies/search_kernels.py) on
first use: numba is imported then, not with the pricing, so a CPU server that never runs duet does
not pay for it. Without numba (it is a dependency, but a GPU host may lack the wheel) or with
SGLANG_DUET_NUMPY_SEARCH=1, `AVAILABLE` is False and duet runs its numpy path (the same plans)."""
from __future__ import annotations

import importlib
import importlib.util
import os

AVAILABLE = (os.environ.get("SGLANG_DUET_NUMPY_SEARCH", "") in ("", "0")
             and importlib.util.find_spec("numba") is not None)


def kernels():
    """policies/search_kernels.py (compiled on first call of each kernel, or loaded from numba's cache)."""
    return importlib.import_module("sglang_duet.policies.search_kernels")
