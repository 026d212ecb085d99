"""Command-line flags of the server: one per ServerArgs field, with SGLang's names.

The parser is built from the dataclass so a new ServerArgs field gets a flag without touching this
file; `_SPECS` only adds help, choices and aliases. Checks that need no model run here, so a wrong
flag fails in a second with a message naming it instead of after the model load.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from sglang_duet.model_loader.serving_config import missing_model_message
from sglang_duet.server_args import ServerArgs

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# field -> (help, extra argparse kwargs)
_SPECS: dict[str, tuple[str, dict]] = {
    "model_path": ("HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
                   {"aliases": ["--model"]}),
    "load_format": ("weights format", {"choices": ["auto", "safetensors", "gguf", "dummy"]}),
    "model_config": ("model config JSON for --load-format dummy and the emulated executor", {}),
    "dtype": ("weights/activations dtype", {"choices": ["auto", "bfloat16", "float16", "float32", "half",
                                                        "float", "bf16", "fp16", "fp32"]}),
    "device": ("device to run on", {"choices": ["auto", "cpu", "cuda"]}),
    "served_model_name": ("model name in the OpenAI API (default: the model path)", {}),
    "tokenizer_path": ("a local tokenizer folder to use instead of the model's", {}),
    "chat_template": ("a Jinja chat template file (or an HF JSON file holding one) to use instead of the "
                      "tokenizer's", {}),
    "trust_remote_code": ("accepted for SGLang compatibility; only built-in architectures are loaded and no "
                          "remote code is ever run", {}),
    "context_length": ("max tokens per sequence (default: the model's)", {}),
    "mem_fraction_static": ("GPU: fraction of device memory for weights + KV cache", {}),
    "kv_cache_bytes": ("CPU: byte budget of the KV pool", {}),
    "max_total_tokens": ("KV pool size in tokens (overrides the memory settings)", {}),
    "max_running_requests": ("max requests holding KV at once", {}),
    "max_queued_requests": ("max waiting requests; more get HTTP 503", {}),
    "policy": ("scheduling policy: a built-in name or a path to a policy .py file (unset: chunked on a CPU, "
               "with a prefill budget sized from the CPU's measured speed; aggregated on a GPU)", {}),
    "policy_config": ("YAML/JSON file of policy options", {}),
    "chunked_prefill_size": ("prefill token budget per step (unset: 8192 on a GPU; on a CPU with no --policy, the "
                             "largest whose mixed step the CPU's calibration predicts within --tbt-slo-ms, in "
                             "64..8192, else 512); -1 turns chunking off (a prompt is never split)", {}),
    "schedule_policy": ("order of the waiting queue (SGLang's flag): fcfs, or lpm (longest cached prefix first "
                        "among the first 64 waiting; fcfs with --disable-radix-cache)", {"choices": ["fcfs", "lpm"]}),
    "disable_radix_cache": ("turn the radix prefix cache off", {}),
    "constrained_json_disable_any_whitespace": ("structured output: JSON in the compact form (\", \" and \": \" "
                                                "between items) instead of any whitespace (SGLang's flag)", {}),
    "tbt_slo_ms": ("time-between-tokens SLO in ms (policies that use it; on a CPU with no --policy, the step "
                   "time the default prefill budget is sized for)", {}),
    "ttft_slo_ms": ("time-to-first-token SLO in ms (policies that use it)", {}),
    "executor": ("run a real model, or emulate a GPU with the roofline cost model",
                 {"choices": ["model", "emulated"]}),
    "hardware": ("hardware file or name (configs/hardware) for the cost model / emulator", {}),
    "emulated_step_ms": ("--executor emulated: every launch costs exactly this many ms, whatever its batch "
                         "(a constant-step device for measuring host overhead; benchmark/host_overhead.py)", {}),
    "stream_interval": ("streaming: send a request's tokens every N tokens (its first token and its end at once); "
                        "larger values cost less host time per token at many streams", {}),
    "attention_backend": ("attention backend", {}),
    "disable_cuda_graph": ("do not capture CUDA graphs", {}),
    "enable_torch_compile": ("CPU: decode and mixed (decodes + prefill chunks) steps through one torch.compile'd "
                             "decoder layer (the default on a CPU where "
                             "a C++ compiler is found; compiled at start-up: ~12 s the first time on 2 cores, ~5 s "
                             "after; a failure falls back to eager with a warning)", {}),
    "disable_torch_compile": ("CPU: run every step eagerly (no start-up compile; as SGLANG_DUET_CPU_COMPILE=0)", {}),
    "disable_overlap_schedule": ("plan each step only after the previous one ended (default: aggregated and chunked "
                                 "plan the next step while one runs, on executors that support it)", {}),
    "cuda_graph_max_bs": ("largest decode batch captured in a CUDA graph (default 256)", {}),
    "lanes": ("executor lanes: 2 runs split plans' prefill and decode concurrently on SM partitions",
              {"choices": ["auto", "1", "2"]}),
    "sm_partition_backend": ("how SM partitions (green contexts) are made", {"choices": ["auto", "cuda", "torch", "none"]}),
    "cpu_threads": ("CPU: torch threads of the model process (default: one per physical core of its CPUs, i.e. "
                    "the cores left after the main process and detokenizer; OMP_NUM_THREADS if set)", {}),
    "cpu_bind": ("CPU: auto pins the model process's threads one per core and leaves the lowest CPU (2 from 9 "
                 "CPUs up) to the main process and detokenizer; off leaves placement to the OS; or the model "
                 "process's CPUs as a list such as 1-3 (the rest go to the others)", {}),
    "random_seed": ("seed for dummy weights and for requests without a seed", {}),
    "host": ("HTTP host", {}),
    "port": ("HTTP port", {}),
    "api_key": ("require `Authorization: Bearer KEY` on every route but /health", {}),
    "log_level": ("log level (any case)", {"choices": list(LOG_LEVELS), "type": str.lower}),
    "log_requests": ("log each request's body (first 2 KB) and its outcome", {}),
    "enable_metrics": ("accepted for SGLang compatibility: Prometheus /metrics is always served", {}),
    "watchdog_timeout": ("seconds the scheduler may go without reporting while alive before the server "
                         "declares it hung and exits non-zero", {}),
    "tp_size": ("tensor parallel size: one scheduler rank (process) per shard, rank 0 broadcasts each step; "
                "with --executor emulated, one process emulates the group (priced by cost_model/tp.py)",
                {"aliases": ["--tensor-parallel-size"]}),
    "dist_init_addr": ("HOST:PORT where the tensor-parallel ranks meet (rank 0's machine; default: a free "
                       "local port)", {"aliases": ["--nccl-init-addr"]}),
    "nnodes": ("machines the --tp-size ranks are spread over", {}),
    "node_rank": ("this machine's index among --nnodes (0 serves HTTP; others run follower ranks only)", {}),
    "dist_timeout": ("seconds a tensor-parallel collective may wait before it fails (default 300)", {}),
    "skip_warmup": ("do not send a warm-up request before reporting ready", {}),
    "max_request_bytes": ("largest HTTP request body accepted; larger ones get HTTP 413", {}),
    "shutdown_grace_s": ("on SIGTERM, seconds in-flight requests may still finish before they are failed", {}),
    # disaggregation (sglang_duet/disagg)
    "disaggregation_mode": ("run a prefill or a decode instance for `python -m sglang_duet.router`, or pd-local: "
                            "1 prefill + 1 decode instance and the router on --port",
                            {"choices": ["null", "prefill", "decode", "pd-local"]}),
    "disaggregation_transfer_backend": ("how decode instances pull KV from prefill instances (auto: cuda-ipc for a "
                                        "GPU pool, shm for a CPU pool, plus mooncake for peers on other hosts "
                                        "where the Mooncake engine is installed; none for the emulated executor)",
                                        {"choices": ["auto", "shm", "cuda-ipc", "mooncake", "none"]}),
    "disaggregation_bootstrap_port": ("prefill instance: TCP port of its KV control socket, the BOOTSTRAP_PORT of "
                                      "`sglang_router.launch_router --prefill URL BOOTSTRAP_PORT` (SGLang's default; "
                                      "0: a free port; pd-local takes a free one unless given another)", {}),
    "disaggregation_kv_timeout_s": ("prefill: free KV not pulled within this many seconds; decode: refuse a "
                                    "request that finds no KV room within it", {}),
    "pd_local_router": ("the router --disaggregation-mode pd-local starts: sglang (sglang_router.launch_router "
                        "--pd-disaggregation), builtin (python -m sglang_duet.router: retries with the same KV, "
                        "decode chosen by free KV, /disagg/instances), auto (sglang if installed)",
                        {"choices": ["auto", "sglang", "builtin"]}),
}
_SKIP = {"extra"}


def _type_of(default, annotation: str):
    ann = str(annotation)
    if "bool" in ann:
        return bool
    if "int" in ann:
        return int
    if "float" in ann:
        return float
    return str


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    for f in fields(ServerArgs):
        if f.name in _SKIP:
            continue
        help_text, extra = _SPECS.get(f.name, ("", {}))
        extra = dict(extra)
        names = ["--" + f.name.replace("_", "-")] + extra.pop("aliases", [])
        default = f.default if f.default is not MISSING else None
        typ = _type_of(default, f.type)
        if typ is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=default, help=help_text)
        else:
            typ = extra.pop("type", typ)
            parser.add_argument(*names, dest=f.name, type=typ, default=default,
                                help=help_text or None, **extra)  # the parser's formatter adds the default


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a model over HTTP (OpenAI API + SGLang native API).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_cli_args(p)
    return p


def server_args_from_namespace(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerArgs:
    kwargs = {f.name: getattr(ns, f.name) for f in fields(ServerArgs) if f.name not in _SKIP and hasattr(ns, f.name)}
    args = ServerArgs(**kwargs)
    problem = check_server_args(args)
    if problem:
        parser.error(problem)
    return args


def check_server_args(a: ServerArgs) -> str | None:
    """The first problem found, worded with the flag's name; None if all is well."""
    if a.tp_size < 1:
        return f"--tp-size {a.tp_size}: must be >= 1"
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        return f"--node-rank {a.node_rank}: must be in [0, --nnodes {a.nnodes})"
    if a.tp_size % a.nnodes:
        return f"--tp-size {a.tp_size}: must be a multiple of --nnodes {a.nnodes}"
    if a.nnodes > 1 and not a.dist_init_addr:
        return "--nnodes > 1 needs --dist-init-addr HOST:PORT"
    if a.tp_size > 1 and a.executor == "emulated" and a.nnodes > 1:
        return (f"--nnodes {a.nnodes}: --executor emulated emulates the whole --tp-size {a.tp_size} group in one "
                "process (cost_model/tp.py prices it); use --nnodes 1")
    if a.tp_size > 1 and a.disaggregation_mode != "null":
        return (f"--tp-size {a.tp_size} with --disaggregation-mode {a.disaggregation_mode}: KV transfer between "
                "tensor-parallel instances (each rank holds only its KV heads) is not supported yet")
    if not 0 < a.port < 65536:
        return f"--port {a.port}: must be in 1..65535"
    if a.mem_fraction_static is not None and not 0.0 < a.mem_fraction_static <= 1.0:
        return f"--mem-fraction-static {a.mem_fraction_static}: must be in (0, 1]"
    if a.chunked_prefill_size is not None and a.chunked_prefill_size <= 0 and a.chunked_prefill_size != -1:
        return f"--chunked-prefill-size {a.chunked_prefill_size}: must be positive, or -1 for no chunking"
    if not a.watchdog_timeout > 0:
        return f"--watchdog-timeout {a.watchdog_timeout}: must be positive"
    if a.log_level.lower() not in LOG_LEVELS:
        return f"--log-level {a.log_level}: must be one of {', '.join(LOG_LEVELS)}"
    for name in ("context_length", "max_total_tokens", "max_running_requests", "kv_cache_bytes"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            return f"--{name.replace('_', '-')} {v}: must be positive"
    if hasattr(os, "sched_getaffinity"):
        from sglang_duet.server.cpu_threads import check_cpu_flags

        problem = check_cpu_flags(a.cpu_threads, a.cpu_bind, os.sched_getaffinity(0))
        if problem:
            return problem
    elif a.cpu_threads is not None and a.cpu_threads < 1:
        return f"--cpu-threads {a.cpu_threads}: must be at least 1"
    if a.stream_interval < 1:
        return f"--stream-interval {a.stream_interval}: must be at least 1"
    if a.emulated_step_ms is not None:
        if not a.emulated_step_ms > 0:
            return f"--emulated-step-ms {a.emulated_step_ms}: must be positive"
        if a.executor != "emulated":
            return "--emulated-step-ms needs --executor emulated"
    if a.max_request_bytes <= 0:
        return f"--max-request-bytes {a.max_request_bytes}: must be positive"
    if not a.shutdown_grace_s >= 0:
        return f"--shutdown-grace-s {a.shutdown_grace_s}: must be at least 0"
    if a.max_queued_requests is not None and a.max_queued_requests < 0:
        return f"--max-queued-requests {a.max_queued_requests}: must be at least 0"
    if not a.disaggregation_kv_timeout_s > 0:
        return f"--disaggregation-kv-timeout-s {a.disaggregation_kv_timeout_s}: must be positive"
    for name in ("tbt_slo_ms", "ttft_slo_ms"):
        v = getattr(a, name)
        if not v > 0:
            return f"--{name.replace('_', '-')} {v}: must be positive"
    for name in ("model_path", "tokenizer_path", "model_config", "policy_config", "chat_template"):
        v = getattr(a, name)
        if v is not None and not os.path.exists(v):
            return missing_model_message(f"--{name.replace('_', '-')}", v)
    try:
        from sglang_duet.policies.base import BUILTIN_POLICIES
    except ImportError:  # policies package missing: let the scheduler report it
        return None
    if a.policy is not None and a.policy not in BUILTIN_POLICIES:
        if not a.policy.endswith(".py"):
            known = ", ".join(sorted(BUILTIN_POLICIES))
            return f"--policy {a.policy}: unknown policy; use one of {known} or a path to a .py file"
        if not os.path.isfile(a.policy):
            return f"--policy {a.policy}: no such policy file"
    return None


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> ServerArgs:
    parser = make_parser(prog)
    ns = parser.parse_args(argv)
    return server_args_from_namespace(ns, parser)
