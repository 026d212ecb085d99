"""All knobs of an engine or server, with SGLang's names where SGLang has the knob."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port


@dataclass
class ServerArgs:
    model_path: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    model_config: str | None = None  # config file for --load-format dummy / the emulated executor
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cpu | cuda
    served_model_name: str | None = None
    tokenizer_path: str | None = None  # a tokenizer folder other than the model's
    chat_template: str | None = None  # a Jinja template file instead of the tokenizer's
    trust_remote_code: bool = False  # accepted for SGLang's command lines; no remote code is ever run
    context_length: int | None = None
    # memory
    mem_fraction_static: float | None = None  # GPU: share of device memory for weights + KV
    kv_cache_bytes: int | None = None  # CPU: byte budget of the KV pool (default 1 GiB)
    max_total_tokens: int | None = None  # overrides both: KV pool size in tokens
    max_running_requests: int | None = None
    max_queued_requests: int | None = None
    # scheduling
    # a built-in name or a path to a policy file; None: on a CPU, chunked with a prefill budget sized from the
    # CPU's measured speed (cost_model/cpu_budget.py), elsewhere aggregated
    policy: str | None = None
    policy_config: str | None = None  # YAML/JSON file of policy options
    # prefill token budget per step; None: 8192 (SGLang's default) on a GPU; on a CPU, with no --policy, the
    # largest whose mixed step fits --tbt-slo-ms by the CPU's calibration (else 512); -1: no chunking
    chunked_prefill_size: int | None = None
    schedule_policy: str = "fcfs"  # SGLang's waiting-queue order: fcfs, or lpm (longest cached prefix first)
    disable_radix_cache: bool = False  # the radix prefix cache is on unless this is set
    # structured output: JSON allows any whitespace between items (SGLang's default) unless this is set
    constrained_json_disable_any_whitespace: bool = False
    tbt_slo_ms: float = 100.0
    ttft_slo_ms: float = 1000.0
    # execution
    executor: str = "model"  # model | emulated
    hardware: str = "h100"  # hardware file for the emulated executor / cost model
    emulated_step_ms: float | None = None  # emulated executor: every launch costs exactly this (cost_model/constant.py)
    attention_backend: str = "auto"  # auto: flashinfer, else triton, else torch on a GPU; torch on a CPU
    disable_cuda_graph: bool = False
    # SGLang's flag. Here: the CPU decode step through torch.compile (models/decode_step.py), which a CPU model
    # gets by default anyway where it can run (one rank, a C++ compiler): this flag makes a failure to a
    # warning; --disable-torch-compile (vLLM's --enforce-eager) or SGLANG_DUET_CPU_COMPILE=0 runs eagerly.
    # The first compile takes ~12 s on 2 cores, later starts ~5 s (inductor's cache under the cache folder)
    enable_torch_compile: bool = False
    disable_torch_compile: bool = False
    # Overlap scheduling (SGLang's flag): plan the next step while one runs, where the policy and the
    # executor support it (aggregated/chunked on the emulated GPU or the async GPU executor)
    disable_overlap_schedule: bool = False
    cuda_graph_max_bs: int | None = None
    lanes: str = "auto"  # auto | 1 | 2; auto: two lanes on CUDA when the policy can split
    sm_partition_backend: str = "auto"  # auto | cuda | torch | none (green contexts via cuda-bindings or torch)
    random_seed: int = 0
    # CPU: torch threads of the model process (None: one per physical core left after the main process and
    # detokenizer) and where they run (auto: pinned, the lowest CPUs left to the others; off; a CPU list)
    cpu_threads: int | None = None
    cpu_bind: str = "auto"
    # server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    log_requests: bool = False  # log every request's body (truncated) and its outcome
    enable_metrics: bool = False  # accepted for SGLang's command lines: /metrics is always served
    watchdog_timeout: float = 300.0  # a scheduler silent this long while alive is hung: the server exits
    tp_size: int = 1  # tensor parallelism: one process per rank (sglang_duet/distributed)
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous (default: a free local port)
    nnodes: int = 1
    node_rank: int = 0
    dist_timeout: float | None = None  # seconds a collective may wait before it fails (default 300)
    skip_warmup: bool = False
    max_request_bytes: int = 32 << 20  # larger HTTP bodies get 413 before they are read
    stream_interval: int = 1  # stream every N tokens (SGLang's flag); the first and the last are sent at once
    shutdown_grace_s: float = 10.0  # SIGTERM: in-flight requests may finish this long, then get an error
    # disaggregated serving (sglang_duet/disagg, docs/disaggregation.md)
    disaggregation_mode: str = "null"  # null | prefill | decode | pd-local (1 prefill + 1 decode + router)
    disaggregation_transfer_backend: str = "auto"  # auto | shm | cuda-ipc | mooncake | none
    # prefill: TCP port of the KV control socket, sglang-router's BOOTSTRAP_PORT; SGLang's default (0: any free port)
    disaggregation_bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    disaggregation_kv_timeout_s: float = 60.0  # prefill: hold unpulled KV this long; decode: wait for KV room
    pd_local_router: str = "auto"  # pd-local's router: sglang (sglang-router) | builtin (sglang_duet.router) | auto
    extra: dict = field(default_factory=dict)


def fill_resolved_policy(args: ServerArgs, policy_info: dict) -> None:
    """Copy what the scheduler resolved an unset --policy / --chunked-prefill-size to (its ReadyInfo's
    policy) into the main process's args, so /get_server_info reports what runs: SGLang users read
    `chunked_prefill_size` there, and SGLang reports its resolved value too."""
    if args.policy is None and policy_info.get("name"):
        args.policy = policy_info["name"]
    if args.chunked_prefill_size is None and isinstance(policy_info.get("chunked_prefill_size"), int):
        args.chunked_prefill_size = policy_info["chunked_prefill_size"]
