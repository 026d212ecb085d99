"""CPU threads of the model process: how many, and on which CPUs (`--cpu-threads`, `--cpu-bind`).

On a CPU the scheduler process runs the model with torch's intra-op threads while the main process
(HTTP, tokenization) and the detokenizer need CPU time of their own. Left to the kernel, the model's
threads and those processes preempt each other: a forward pass waits for its slowest thread, so one
preempted thread stalls the whole step. As vLLM's CPU build does, the launcher splits the CPUs this
process may use (`os.sched_getaffinity`, so a taskset/cgroup limit is respected):

  * the lowest-numbered CPUs (1 of up to 8, else 2) go to the main process and the detokenizer;
  * the rest to the model process, with one torch thread per physical core among them (a second
    hyperthread on a core only competes for the same execution units), each thread pinned to one
    CPU (GOMP_CPU_AFFINITY: torch's OpenMP runtime binds thread i to the i-th CPU listed);
  * except where that would leave the model a single physical core (2 CPUs): its threads then span
    every core, its own first (thread 0, the one that also runs Python, never shares), the last
    sharing the main process's CPU. Measured on 2 AVX2 cores serving SmolLM2 under a 16-concurrent
    burst, the main process, the detokenizer and bench_serving's client together used about a third of
    CPU 0 (CPU seconds over the run), so the model's second thread gets the rest: output tok/s
    60 -> 88, median TPOT 219 -> 148 ms, one-at-a-time TPOT unchanged
    (benchmark/results/cpu_vs_peer-cpu2-vllm-fp32.md, stop 27).

`plan_cpu_threads` is the pure rule (tests call it with made-up CPU sets and topologies). The
launcher (server/launcher.py) spawns the model process with the plan's thread count (and threads'
CPUs) in its environment, and moves the processes onto their CPU sets once the server is ready:
during start-up the three processes import and load on every CPU (pinned from the spawn, the
start-up on 2 cores took longer, each side waiting on its one CPU). Not applied: one CPU
(nothing to split), tensor parallelism (each rank sizes its own threads), the emulated executor (no
model), a model on a GPU; OMP_NUM_THREADS set by the user fixes the thread count, and a user's own
GOMP_CPU_AFFINITY / KMP_AFFINITY is left alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

BIND_MODES = ("auto", "off")


@dataclass(frozen=True)
class CpuPlan:
    threads: int  # torch intra-op threads of the model process
    model_cpus: tuple[int, ...]  # the model process's CPU set (empty: not pinned)
    other_cpus: tuple[int, ...]  # the main process's and the detokenizer's (empty: not pinned)
    thread_cpus: tuple[int, ...] = ()  # CPU of torch thread i (GOMP_CPU_AFFINITY); empty: not pinned
    notes: list[str] = field(default_factory=list, compare=False)

    @property
    def pinned(self) -> bool:
        return bool(self.model_cpus)

    def model_env(self) -> dict[str, str]:
        """Environment of the model process: the thread count, and with two threads or more each one's
        CPU. (One thread needs no binding beyond the process's CPU set; and libgomp binds the process's
        first thread as soon as torch loads it, so the binding would hold during start-up too.)"""
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.thread_cpus and self.threads >= 2:
            env["GOMP_CPU_AFFINITY"] = " ".join(map(str, self.thread_cpus))
        return env

    def describe(self) -> str:
        if not self.pinned:
            return f"model process: {self.threads} torch thread(s), not pinned" + "".join(f"; {n}" for n in self.notes)
        return (f"model process on CPUs {_cpu_list(self.model_cpus)} with {self.threads} torch thread(s)"
                f"{' pinned to ' + ','.join(map(str, self.thread_cpus)) if self.thread_cpus else ''}; main process and "
                f"detokenizer on CPUs {_cpu_list(self.other_cpus)}")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6). ValueError with the reason on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in CPU list {text!r}")
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 2-5)") from None
        if a < 0 or b < a:
            raise ValueError(f"{part!r} is not a valid CPU range")
        cpus.update(range(a, b + 1))
    return tuple(sorted(cpus))


def _cpu_list(cpus) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def check_cpu_flags(threads: int | None, bind: str, allowed: set[int]) -> str | None:
    """The CLI's check of --cpu-threads / --cpu-bind: the problem, worded with the flag, or None."""
    if threads is not None and threads < 1:
        return f"--cpu-threads {threads}: must be at least 1"
    if bind == "off" or len(allowed) < 2:
        return None
    if bind == "auto":
        n_model = len(_auto_split(tuple(sorted(allowed)), {})[0])
        if threads is not None and threads > n_model:
            return (f"--cpu-threads {threads}: more threads than the {n_model} CPU(s) --cpu-bind auto gives the model "
                    f"process of the {len(allowed)} available (pass --cpu-bind off to place them freely)")
        return None
    try:
        cpus = parse_cpu_list(bind)
    except ValueError as e:
        return f"--cpu-bind {bind}: expected auto, off or a CPU list such as 1-3,6 ({e})"
    outside = sorted(set(cpus) - allowed)
    if outside:
        return (f"--cpu-bind {bind}: CPU(s) {_cpu_list(outside)} are not available to this process "
                f"(allowed: {_cpu_list(allowed)})")
    if set(cpus) == allowed and len(allowed) > 1:
        return f"--cpu-bind {bind}: leave at least one CPU of {_cpu_list(allowed)} to the main process and detokenizer"
    if threads is not None and threads > len(cpus):
        return f"--cpu-threads {threads}: more threads than the {len(cpus)} CPU(s) of --cpu-bind {bind}"
    return None


def _reserved(n_cpus: int) -> int:
    """CPUs --cpu-bind auto leaves to the main process and the detokenizer."""
    return 1 if n_cpus <= 8 else 2


def _core(cpu: int, core_of: dict):
    return core_of.get(cpu, ("cpu", cpu))


def _auto_split(allowed: tuple[int, ...], core_of: dict, threads: int | None = None
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(model CPUs in thread order, the main process's and detokenizer's CPUs) for --cpu-bind auto: the
    lowest CPUs to the other processes; where the rest is one physical core (and more than one thread is
    wanted, or the count is left to the plan), the model shares theirs too."""
    reserve = _reserved(len(allowed))
    model_cpus, other_cpus = allowed[reserve:], allowed[:reserve]
    one_core_left = len({_core(c, core_of) for c in model_cpus}) == 1
    if one_core_left and len({_core(c, core_of) for c in allowed}) > 1 and (threads is None or threads > 1):
        model_cpus = model_cpus + other_cpus  # its own core first: thread 0 runs Python too
    return model_cpus, other_cpus


def plan_cpu_threads(allowed, threads: int | None = None, bind: str = "auto", core_of: dict | None = None,
                     env: dict | None = None) -> CpuPlan:
    """The plan for a model process given the CPUs this process may use (`allowed`), --cpu-threads
    (`threads`), --cpu-bind (`bind`: auto | off | a CPU list for the model process), the physical core
    of each CPU (`core_of`; a CPU missing from it is its own core) and the environment (`env`).
    Flags are assumed checked (check_cpu_flags)."""
    allowed = tuple(sorted(set(allowed)))
    env = os.environ if env is None else env
    core_of = core_of or {}
    notes = []
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if threads is None and omp.isdigit() and int(omp) >= 1:
        threads = int(omp)
        notes.append(f"OMP_NUM_THREADS={omp}")
    if bind == "off" or len(allowed) < 2:
        if len(allowed) < 2 and bind != "off":
            notes.append("one CPU: nothing to split")
        # as before this module: leave one CPU to the other two processes
        return CpuPlan(threads or max(1, len(allowed) - 1), (), (), (), notes)
    if bind == "auto":
        model_cpus, other_cpus = _auto_split(allowed, core_of, threads)
    else:
        model_cpus = parse_cpu_list(bind)
        other_cpus = tuple(c for c in allowed if c not in model_cpus)
    # one thread per physical core: the first CPU of each core among the model's CPUs
    seen, per_core = set(), []
    for c in model_cpus:
        core = _core(c, core_of)
        if core not in seen:
            seen.add(core)
            per_core.append(c)
    threads = threads or len(per_core)
    user_affinity = any(env.get(k) for k in ("GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES"))
    if user_affinity:
        notes.append("thread affinity left to the environment's OpenMP settings")
        thread_cpus = ()
    elif threads <= len(per_core):
        thread_cpus = tuple(per_core[:threads])
    else:  # more threads than cores (an explicit --cpu-threads): hyperthreads too, then round robin
        rest = [c for c in model_cpus if c not in per_core]
        order = per_core + rest
        thread_cpus = tuple(order[i % len(order)] for i in range(threads))
    return CpuPlan(threads, tuple(model_cpus), tuple(other_cpus), thread_cpus, notes)


def cpu_topology() -> dict[int, tuple[int, int]]:
    """CPU -> (package, core) from sysfs (Linux); empty where unreadable."""
    out = {}
    for c in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ():
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = int(f.read())
            with open(base + "core_id") as f:
                core = int(f.read())
        except (OSError, ValueError):
            continue
        out[c] = (pkg, core)
    return out


def plan_for_server(args) -> CpuPlan | None:
    """The plan the launcher applies for these server args, or None where it does not apply."""
    if not hasattr(os, "sched_getaffinity") or args.executor != "model" or args.tp_size > 1:
        return None
    if args.device == "cuda" or (args.device == "auto" and _cuda_available()):
        return None
    return plan_cpu_threads(os.sched_getaffinity(0), args.cpu_threads, args.cpu_bind, cpu_topology())


def _cuda_available() -> bool:
    # without importing torch in the main process (seconds of start-up): a CUDA build and a device node
    import glob
    import importlib.util

    return importlib.util.find_spec("torch") is not None and bool(glob.glob("/dev/nvidia[0-9]*"))


def start_process_with_env(proc, env: dict | None = None) -> None:
    """proc.start() with `env` added to the child's environment (a spawned child reads it at start);
    this process's environment is restored afterwards. Call before other threads of this process start."""
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pin_process(pid: int, cpus) -> int:
    """Move every thread of process `pid` (0: this one) onto `cpus`, except threads already within them
    (torch's OpenMP threads, each bound to its own CPU by GOMP_CPU_AFFINITY, keep that binding).
    os.sched_setaffinity(pid) alone moves only one thread. Threads started later inherit the CPU set
    of the thread that starts them. Returns how many threads were moved."""
    cpus = set(cpus)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid or 'self'}/task")]
    except OSError:
        tids = [pid]
    moved = 0
    for tid in tids:
        try:
            if not os.sched_getaffinity(tid) <= cpus:
                os.sched_setaffinity(tid, cpus)
                moved += 1
        except OSError:  # a thread that just ended
            pass
    return moved
