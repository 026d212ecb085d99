"""Serving-layout weights mapped from one file: loaded without a copy, shared by every process.

A CPU load of a checkpoint copies every tensor into freshly allocated parameters and then
concatenates q/k/v and gate/up (models/llama.py, fuse_projections): ~1 GB of memory traffic for
SmolLM2-135M and, per process, a private copy of the weights. Here the weights are written once in
the layout the forward reads (the fused tensors themselves, in the serving dtype) into
`<model folder>/serving/`, and later loads map that file: the parameters are views of a private
file mapping (safetensors' `safe_open`, which maps the file with torch's `UntypedStorage.from_file`),
so the load reads nothing up front, and processes that map the same file (servers, benchmark
runs, tensor data of a restarted server) share its pages through the page cache. A write to a
parameter would copy only the touched page (MAP_PRIVATE) and never reach the file.

Used for the embedded default model on a CPU without tensor parallelism (its folder is ours, see
embedded.py). The file name carries a key of what it was built from (the checkpoint files' names,
sizes and mtimes, the dtype, LAYOUT_VERSION), so a changed checkpoint or dtype builds a new one;
it appears atomically (temp file, then rename), as the embedded folder does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import torch

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # bump when serving_tensors() changes what it returns (2: the few-row [in, out] copies)
ALIGN = 64  # bytes: the data section starts on a cache line (every tensor of a Llama is a multiple of it)
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def prepared_path(checkpoint_files: list[str], dtype: torch.dtype) -> str:
    """Where the serving-layout file of these checkpoint files in `dtype` lives."""
    stats = []
    for f in sorted(checkpoint_files):
        st = os.stat(f)
        stats.append((os.path.basename(f), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"v": LAYOUT_VERSION, "dtype": _dtype_name(dtype), "files": stats}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    folder = os.path.join(os.path.dirname(os.path.abspath(checkpoint_files[0])), "serving")
    return os.path.join(folder, f"model-{_dtype_name(dtype)}-{key}.safetensors")


def write_prepared(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write `tensors` as a safetensors file at `path` (atomically), the data section 64-byte aligned."""
    header: dict = {"__metadata__": {"format": "pt", "layout": str(LAYOUT_VERSION)}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be prepared")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)  # the format allows trailing spaces in the header
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for t in tensors.values():
                f.write(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # a concurrent writer's identical file may win; either is complete
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def map_prepared(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors as views of one private mapping of it (nothing is read until touched)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files whose mapping in this process holds `tensor`'s data (Linux /proc/self/maps; empty
    elsewhere or for an ordinary allocation)."""
    ptr = tensor.data_ptr()
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5].strip()
                if lo <= ptr < hi and name.startswith("/"):  # not [heap], [anon:...] and the like
                    found.append(name)
    except OSError:
        pass
    return found


def load_prepared(model, checkpoint_files: list[str], build_copy) -> str:
    """Point `model`'s parameters (a model built on the meta device) at the mapped serving file of
    `checkpoint_files` in the model's dtype, building that file first from `build_copy()` (a loaded,
    fused model) when it is missing. Returns the file's path."""
    path = prepared_path(checkpoint_files, model.dtype)
    if not os.path.isfile(path):
        write_prepared(build_copy().serving_tensors(), path)
        logger.info("wrote the serving-layout weights %s (mapped from now on)", path)
    model.adopt_serving_tensors(map_prepared(path))
    return path
