"""SM partitions of one GPU: CUDA green contexts and their streams, created once per process.

DuetServe runs a prefill lane and a decode lane on disjoint sets of SMs. A kernel launched on a
stream of a green context runs only on that context's SMs, so a partition here is a pair of
green-context streams: a decode stream with S_d SMs and a prefill stream with the rest.

* The grid: decode sizes S_d are multiples of the granularity (8 on Hopper) from the minimum up,
  leaving the prefill side at least the minimum too (H100/H200: 8, 16, ..., 120), the same grid
  as `HardwareSpec.partition_grid()`. Requests round UP to the grid, as the driver does.
* Contexts are created lazily, per requested split, and cached for the process lifetime:
  creating one costs driver calls, and CUDA graphs captured on its stream stay bound to it.
* Always read back what was granted: the driver may round a request up.

Backends:
  cuda   cuda-bindings (`cuda.bindings.driver`): one `cuDevSmResourceSplitByCount` per split gives
         the decode group AND the remainder, so the two contexts are disjoint; the granted counts
         come from `cuGreenCtxGetDevResource`. The one to use on the GPU.
  torch  `torch.cuda.green_contexts.GreenContext.create(num_sms=N)`: each call splits the whole
         device on its own, so a decode context and a prefill context overlap (both take the first
         SMs). Fine for one partition at a time (calibration); for two lanes it confines the
         decode lane only in count, not in place. torch cannot report the granted count: the grid
         rounding is reported instead (`exact_grants` is False).
  none   no green contexts (a CPU, an old driver, a GPU without them): records what would have
         been created and hands out ordinary streams on a GPU (lanes overlap, unconfined) or None
         on a CPU. Used by the CPU tests and by the two-lane executor's CPU mode.
  auto   cuda if importable and the device is CUDA, else torch if supported, else none.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "torch", "none")


class PartitionError(ValueError):
    """A partition that cannot exist (off the grid, too large) or a backend that cannot run here."""


@dataclass(frozen=True)
class ContextRecord:
    """One green context created (or, with the `none` backend, that would have been created)."""

    role: str  # "decode" | "prefill" (the remainder of a split) | "single" (one partition alone)
    requested: int
    granted: int
    backend: str
    split_of: int | None = None  # the decode size of the split this context belongs to


@dataclass
class Partition:
    """A two-lane split: decode lane on `decode_sms` SMs, prefill lane on the rest."""

    decode_sms: int  # on the grid (the request rounded up)
    prefill_sms: int  # total - decode_sms
    decode_granted: int
    prefill_granted: int
    decode_stream: object = None  # torch.cuda.Stream, or None on a CPU
    prefill_stream: object = None
    disjoint: bool = False  # the driver guarantees the two SM sets do not overlap
    handles: list = field(default_factory=list, repr=False)  # keep contexts alive with the streams


# ---- backends ------------------------------------------------------------------------------------

class _NoneBackend:
    """No SM confinement: ordinary streams on a GPU, None on a CPU."""

    name = "none"
    exact_grants = False

    def __init__(self, device: torch.device):
        self.device = device

    def _stream(self):
        return torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def single(self, sms: int):
        return self._stream(), sms, None

    def split(self, decode_sms: int, total: int):
        return (self._stream(), decode_sms), (self._stream(), total - decode_sms), False, []


class _TorchBackend:
    """torch.cuda.green_contexts (torch >= 2.11): one independent context per request."""

    name = "torch"
    exact_grants = False

    def __init__(self, device: torch.device):
        from torch.cuda import green_contexts

        if not getattr(green_contexts, "SUPPORTED", False):
            raise PartitionError("SM partition backend 'torch': this torch build has no green-context support")
        self.gc = green_contexts.GreenContext
        self.device = device
        self._warned = False

    def _context(self, sms: int):
        ctx = self.gc.create(num_sms=int(sms), device_id=self.device.index or 0)
        # Stream() makes a new green-context stream on each call (up to a pool of 32): call it once.
        return ctx, ctx.Stream()

    def single(self, sms: int):
        ctx, stream = self._context(sms)
        return stream, sms, ctx

    def split(self, decode_sms: int, total: int):
        if not self._warned:
            logger.warning("SM partition backend 'torch': the prefill and decode green contexts are created "
                           "independently and overlap; use the 'cuda' backend (cuda-bindings) for disjoint lanes")
            self._warned = True
        dctx, dstream = self._context(decode_sms)
        pctx, pstream = self._context(total - decode_sms)
        return (dstream, decode_sms), (pstream, total - decode_sms), False, [dctx, pctx]


class _CudaBackend:
    """cuda-bindings driver API: split once, a context for the group and one for the remainder."""

    name = "cuda"
    exact_grants = True

    def __init__(self, device: torch.device):
        try:
            from cuda.bindings import driver
        except ImportError as e:
            raise PartitionError(f"SM partition backend 'cuda' needs cuda-bindings (cuda.bindings.driver): {e}") from e
        if device.type != "cuda":
            raise PartitionError(f"SM partition backend 'cuda' needs a CUDA device, got {device}")
        self.drv = driver
        self.device = device
        torch.cuda.init()  # the primary context must exist before green contexts are made from it
        torch.cuda.synchronize(device)
        self.dev = self._call("cuDeviceGet", device.index or 0)
        self.sm_type = driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        self.resource = self._call("cuDeviceGetDevResource", self.dev, self.sm_type)
        self.total = int(self.resource.sm.smCount)

    def _call(self, name: str, *args):
        fn = getattr(self.drv, name, None)
        if fn is None:
            raise PartitionError(f"cuda-bindings has no {name}: green contexts need CUDA >= 12.5 bindings")
        out = fn(*args)
        err = out[0]
        if err != self.drv.CUresult.CUDA_SUCCESS:
            _, msg = self.drv.cuGetErrorName(err)
            raise PartitionError(f"{name} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
        return out[1] if len(out) == 2 else out[1:]

    def _split(self, sms: int):
        groups, n, remaining = self._call("cuDevSmResourceSplitByCount", 1, self.resource, 0, int(sms))
        if n < 1:
            raise PartitionError(f"the driver cannot make a group of {sms} SMs out of {self.total}")
        return groups[0], remaining

    def _context(self, resource):
        d = self.drv
        desc = self._call("cuDevResourceGenerateDesc", [resource], 1)
        gctx = self._call("cuGreenCtxCreate", desc, self.dev, d.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
        raw = self._call("cuGreenCtxStreamCreate", gctx, d.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
        granted = int(self._call("cuGreenCtxGetDevResource", gctx, self.sm_type).sm.smCount)
        return _external_stream(int(raw), self.device), granted, (gctx, raw)

    def single(self, sms: int):
        group, _ = self._split(sms)
        return self._context(group)

    def split(self, decode_sms: int, total: int):
        group, remaining = self._split(decode_sms)
        dstream, dgranted, dh = self._context(group)
        pstream, pgranted, ph = self._context(remaining)
        return (dstream, dgranted), (pstream, pgranted), True, [dh, ph]


def _external_stream(handle: int, device: torch.device):
    get = getattr(torch.cuda, "get_stream_from_external", None)
    if get is not None:
        return get(handle, device)
    return torch.cuda.ExternalStream(handle, device=device)


def available_backend(device: torch.device) -> str:
    """What 'auto' resolves to on this machine."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none"
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        return "cuda"
    try:
        from torch.cuda import green_contexts

        if getattr(green_contexts, "SUPPORTED", False):
            return "torch"
    except ImportError:
        pass
    return "none"


# ---- the partitioner -------------------------------------------------------------------------------

class SMPartitioner:
    """Green-context streams on the GPU's partition grid, created per request and kept."""

    def __init__(self, total_sms: int, granularity: int = 8, min_sms: int = 8, backend: str = "auto",
                 device: torch.device | str | None = None):
        if backend not in BACKENDS:
            raise PartitionError(f"SM partition backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if granularity < 1 or min_sms < 1 or total_sms < 2 * min_sms:
            raise PartitionError(f"bad SM grid: total {total_sms}, granularity {granularity}, minimum {min_sms}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.total = int(total_sms)
        self.granularity = int(granularity)
        self.min_sms = int(min_sms)
        self._backend = self._make_backend(backend)
        if self._backend.name == "cuda" and self._backend.total != self.total:
            logger.warning("device reports %d SMs, the grid was set up for %d: using the device's count",
                           self._backend.total, self.total)
            self.total = self._backend.total
        self.records: list[ContextRecord] = []
        self._splits: dict[int, Partition] = {}
        self._singles: dict[int, tuple[object, int, object]] = {}
        self._lock = threading.Lock()  # lanes may ask from different threads

    def _make_backend(self, backend: str):
        makers = {"none": _NoneBackend, "torch": _TorchBackend, "cuda": _CudaBackend}
        if backend != "auto":
            if backend != "none" and self.device.type != "cuda":
                raise PartitionError(f"SM partition backend {backend!r} needs a CUDA device; use 'none' on {self.device}")
            return makers[backend](self.device)
        # auto: the best that works here; a failing one (old driver, bindings without green contexts)
        # falls through to the next with a warning.
        first = available_backend(self.device)
        order = ["cuda", "torch", "none"]
        for name in order[order.index(first):]:
            try:
                return makers[name](self.device)
            except Exception as e:  # noqa: BLE001
                logger.warning("SM partition backend %r unavailable (%s); trying the next", name, e)
        raise AssertionError("unreachable: the 'none' backend always works")

    @classmethod
    def for_device(cls, device: torch.device | str, hardware=None, backend: str = "auto") -> "SMPartitioner":
        """Grid from a HardwareSpec (granularity, minimum); SM count from the device when it is a GPU."""
        device = torch.device(device)
        g = getattr(hardware, "sm_granularity", 8)
        lo = getattr(hardware, "min_partition_sms", 8)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            total = getattr(hardware, "total_sms", 132)
        return cls(total, g, lo, backend, device)

    # ---- the grid --------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def exact_grants(self) -> bool:
        """Whether granted counts are read back from the driver (else: the grid rounding)."""
        return self._backend.exact_grants

    def grid(self) -> list[int]:
        """Decode-partition sizes of a two-lane split (the prefill side keeps at least the minimum)."""
        first = -(-self.min_sms // self.granularity) * self.granularity
        return [s for s in range(first, self.total + 1, self.granularity) if self.total - s >= self.min_sms]

    def sizes(self) -> list[int]:
        """Every size one partition alone may have: the grid, then the whole GPU."""
        return self.grid() + [self.total]

    def round_up(self, sms: int) -> int:
        """The grid size a decode-partition request of `sms` SMs gets (rounded up, as the driver does)."""
        sms = int(sms)
        if sms <= 0:
            raise PartitionError(f"a partition needs at least one SM, got {sms}")
        grid = self.grid()
        for s in grid:
            if s >= sms:
                return s
        raise PartitionError(f"a decode partition of {sms} SMs leaves the prefill side fewer than {self.min_sms} "
                             f"of {self.total} SMs; the largest on the grid is {grid[-1]}")

    def _round_single(self, sms: int) -> int:
        sms = int(sms)
        if sms <= 0:
            raise PartitionError(f"a partition needs at least one SM, got {sms}")
        if sms >= self.total:
            return self.total
        g = self.granularity
        return min(self.total, max(self.min_sms, -(-sms // g) * g))

    # ---- partitions --------------------------------------------------------------------------------
    def split(self, decode_sms: int) -> Partition:
        """The (cached) two-lane split with a decode partition of `decode_sms` SMs, rounded up."""
        sd = self.round_up(decode_sms)
        with self._lock:
            part = self._splits.get(sd)
            if part is not None:
                return part
            (dstream, dgranted), (pstream, pgranted), disjoint, handles = self._backend.split(sd, self.total)
            part = Partition(sd, self.total - sd, dgranted, pgranted, dstream, pstream, disjoint, handles)
            self._splits[sd] = part
            self.records.append(ContextRecord("decode", sd, dgranted, self.backend, sd))
            self.records.append(ContextRecord("prefill", self.total - sd, pgranted, self.backend, sd))
            if dgranted != sd or (self.exact_grants and dgranted + pgranted > self.total):
                logger.warning("split %d: the driver granted %d decode / %d prefill SMs", sd, dgranted, pgranted)
            logger.info("SM split created (%s): decode %d SMs, prefill %d SMs%s", self.backend, dgranted, pgranted,
                        "" if disjoint else " (not guaranteed disjoint)")
            return part

    def split_for_prefill(self, prefill_sms: int) -> Partition:
        """The split whose prefill side is `prefill_sms` SMs (its decode side rounded up to the grid,
        so the prefill side may end up a few SMs smaller than asked)."""
        return self.split(max(1, self.total - int(prefill_sms)))

    def stream(self, sms: int):
        """A stream confined to one partition of `sms` SMs alone (rounded up); None for the whole GPU
        (use the default stream). For measurements of one partition at a time (calibration)."""
        s = self._round_single(sms)
        if s >= self.total:
            return None
        return self._single(s)[0]

    def granted(self, sms: int) -> int:
        """How many SMs a partition of `sms` gets: read back from the driver (cuda backend; the context
        is created if needed), else the grid rounding."""
        s = self._round_single(sms)
        if s >= self.total:
            return self.total
        return self._single(s)[1]

    def _single(self, s: int):
        with self._lock:
            got = self._singles.get(s)
            if got is None:
                got = self._singles[s] = self._backend.single(s)
                self.records.append(ContextRecord("single", s, got[1], self.backend))
            return got

    def describe(self) -> dict:
        """For logs and calibration metadata."""
        return {"backend": self.backend, "total_sms": self.total, "granularity": self.granularity,
                "min_sms": self.min_sms, "exact_grants": self.exact_grants,
                "contexts": [asdict(r) for r in self.records]}
