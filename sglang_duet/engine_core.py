"""The inside of the scheduler process: model (or emulated GPU), KV pool, core, policy, executor.

Used by the offline `Engine` and by the server's scheduler process alike.
"""
from __future__ import annotations

import logging
import random
import time

from sglang_duet.core.scheduler_core import AdmissionError, CoreConfig, RequestUpdate, SchedulerCore
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams, SamplingParamsError
from sglang_duet.server_args import ServerArgs

logger = logging.getLogger(__name__)

CPU_KV_BYTES_DEFAULT = 1 << 30
CPU_KV_SLOTS_MAX = 200_000  # a tiny test model would otherwise get millions of slots
GPU_MEM_FRACTION_DEFAULT = 0.85
MAX_RUNNING_DEFAULT = 256


class EngineCore:
    def __init__(self, args: ServerArgs, clock=time.monotonic, tokenizer_decode_only: bool = False):
        """tokenizer_decode_only: the server's scheduler, which only decodes (stop strings) and needs
        the eos id: a tokenizer loaded without transformers where the loader can (load_tokenizer)."""
        self.args = args
        self.clock = clock
        self.tokenizer_decode_only = tokenizer_decode_only
        self.tp_driver = None  # rank 0 of a tensor-parallel group (sglang_duet.distributed.tp_worker)
        if args.tp_size > 1 and args.executor == "emulated" and args.nnodes > 1:
            raise ValueError(f"--nnodes {args.nnodes}: the emulated executor emulates the whole --tp-size "
                             f"{args.tp_size} group in one process; use --nnodes 1")
        self._rng = random.Random(args.random_seed)
        if args.executor == "emulated":
            self._init_emulated(args)
        elif args.executor == "model":
            try:
                self._init_model(args)
            except BaseException:
                if self.tp_driver is not None:  # do not leave follower ranks waiting for a setup
                    self.tp_driver.shutdown()
                raise
        else:
            raise ValueError(f"--executor must be 'model' or 'emulated', got {args.executor!r}")
        from sglang_duet.model_loader.serving_config import apply_overrides, check_context_length, prefill_budget

        apply_overrides(self, args)  # --tokenizer-path, --chat-template
        self.context_length = check_context_length(args.context_length, self.model_config.max_position_embeddings)
        from sglang_duet.cost_model.cpu_budget import resolve_default_policy

        # no --policy: on a CPU chunked, its budget from the measured speed; elsewhere aggregated
        args, self.default_policy = resolve_default_policy(self, args)
        self.args = args
        self.prefill_budget = prefill_budget(args.chunked_prefill_size, self.context_length,
                                             getattr(self, "device", ""))
        self.policy = load_policy(args.policy, self._policy_context(args))
        self.core = SchedulerCore(
            CoreConfig(
                kv_slots=self.kv_slots,
                context_length=self.context_length,
                max_running_requests=args.max_running_requests or MAX_RUNNING_DEFAULT,
                max_queued_requests=args.max_queued_requests,
                chunked_prefill_size=self.prefill_budget,
                schedule_policy=getattr(args, "schedule_policy", "fcfs"),
                overlap=not args.disable_overlap_schedule and getattr(self.executor, "supports_overlap", False),
                overlap_depth=getattr(self.executor, "overlap_depth", 1),  # launches it may queue behind one
                persistent_rows=getattr(self.executor, "persistent_rows", False),  # it reads rows at submit
            ),
            self.policy,
            clock=clock,
            stop_checker=self._stop_checker(),
        )
        # A decode instance receives each prompt's whole KV and admits it with its own slots: no
        # tree (SGLang's decode server runs without one too); a prefill instance caches prompts.
        if not getattr(args, "disable_radix_cache", False) and args.disaggregation_mode != "decode":
            from sglang_duet.memory.radix_cache import RadixCache

            self.core.prefix_cache = RadixCache(self.core.allocator.free)
        self.eos_ids = self._eos_ids()
        logger.info(
            "engine ready: model=%s policy=%s executor=%s kv_slots=%d context=%d",
            self.model_config.name, self.policy.name, args.executor, self.kv_slots, self.context_length,
        )

    # ---- construction -------------------------------------------------------------------------

    def _init_model(self, args: ServerArgs) -> None:
        import torch

        from sglang_duet.executor.duet_executor import build_executor, resolve_lanes
        from sglang_duet.kernels.attention import get_attention_backend
        from sglang_duet.memory.kv_pool import KVCachePool
        from sglang_duet.model_loader.loader import load_model

        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        tp = None
        if args.tp_size > 1:
            args = self._tp_args(args)
            from sglang_duet.distributed.tp_worker import TPDriver

            self.tp_driver = TPDriver(args, device)
            device, tp = self.tp_driver.device, self.tp_driver.group
        loaded = load_model(args.model_path, load_format=args.load_format, dtype=args.dtype, device=str(device),
                            model_config_path=args.model_config, seed=args.random_seed, tp=tp,
                            tokenizer_decode_only=self.tokenizer_decode_only)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.model_dir = loaded.model_dir
        model = loaded.model
        dtype = next(model.parameters()).dtype
        kv_heads = model.layout.num_kv_heads  # this rank's (all of them without TP)
        per_slot = KVCachePool.bytes_per_slot(self.model_config.num_hidden_layers, kv_heads,
                                              self.model_config.head_dim, dtype)
        if args.max_total_tokens:
            slots = args.max_total_tokens + 1
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            frac = args.mem_fraction_static or GPU_MEM_FRACTION_DEFAULT
            used = total - free
            budget = int(total * frac) - used
            if budget < per_slot * 2:
                raise ValueError(f"--mem-fraction-static {frac}: no memory left for the KV cache after the weights")
            slots = budget // per_slot
        else:
            slots = min((args.kv_cache_bytes or CPU_KV_BYTES_DEFAULT) // per_slot, CPU_KV_SLOTS_MAX)
        self.kv_pool = KVCachePool(self.model_config.num_hidden_layers, int(slots), kv_heads,
                                   self.model_config.head_dim, dtype, device)
        self.kv_slots = int(slots)
        attn_config = self.model_config
        if self.tp_driver is not None:
            from sglang_duet.distributed.tp_worker import local_model_config

            self.tp_driver.setup(self.kv_slots)  # every rank's pool gets the same slots
            model.step_broadcaster = self.tp_driver.step
            attn_config = local_model_config(self.model_config, tp)
        attn = get_attention_backend(args.attention_backend, attn_config, device)
        self.executor = build_executor(model, self.kv_pool, attn, device, args, clock=self.clock)
        self.device = str(device)
        self.lanes = resolve_lanes(args.lanes, device, args.policy)  # what the policy may plan for

    @staticmethod
    def _tp_args(args: ServerArgs) -> ServerArgs:
        """Under TP every forward must go through the model's step broadcast: no CUDA graphs (a
        replayed graph skips the broadcast). One lane runs synchronously; split mode needs an
        explicit `--lanes 2` (each lane then gets its own process groups on every rank, see
        distributed/parallel_state.py): under TP, `--lanes auto` means one lane, even on a GPU."""
        import dataclasses

        from sglang_duet.distributed.tp_worker import tp_lanes

        return dataclasses.replace(args, lanes=str(tp_lanes(args)), disable_cuda_graph=True,
                                   disable_overlap_schedule=True)

    def _init_emulated(self, args: ServerArgs) -> None:
        from sglang_duet.executor.emulated import build_emulated

        build_emulated(self, args)

    def _policy_context(self, args: ServerArgs) -> PolicyContext:
        options = dict(self.default_policy.options) if self.default_policy is not None else {}
        if args.policy_config:
            options.update(_read_config_file(args.policy_config))
        cost_model = hardware = None
        try:
            from sglang_duet.cost_model.hardware import HardwareSpec
            from sglang_duet.cost_model.roofline import CostModel
            from sglang_duet.cost_model.tp import TPCostModel

            cost_model = getattr(self, "emulated_cost_model", None)  # the emulated device's own (a TP group's)
            if cost_model is None:
                hardware = HardwareSpec.load(args.hardware)
                cost_model = (CostModel(self.model_config, hardware) if args.tp_size == 1
                              else TPCostModel(self.model_config, hardware, args.tp_size))
            hardware = cost_model.hw  # a TP group's: N GPUs as one (each SM count per GPU)
        except Exception as e:  # noqa: BLE001 - the cost model is optional for policies that need none
            logger.debug("no cost model: %s", e)
        from sglang_duet.cost_model.cpu_calibration import calibrated_cost_model

        cpu = calibrated_cost_model(self, hardware)  # on a CPU, policies plan with its measured times
        if cpu is not None:
            cost_model, hardware = cpu, cpu.hw
        return PolicyContext(chunked_prefill_size=self.prefill_budget, tbt_slo_ms=args.tbt_slo_ms,
                             ttft_slo_ms=args.ttft_slo_ms, cost_model=cost_model, hardware=hardware, options=options,
                             lanes=getattr(self, "lanes", 2))  # the emulated GPU has both lanes

    def _stop_checker(self):
        if self.tokenizer is None:
            return None
        from sglang_duet.detokenizer import StopChecker

        checker = StopChecker(self.tokenizer)
        return lambda r: checker.check(r.output_ids, r.params.stop, r.params.skip_special_tokens)

    def _eos_ids(self) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(tok_eos)
        return frozenset(ids)

    # ---- requests -------------------------------------------------------------------------------

    #: set by an executor whose token ids come from a tokenizer larger than the model config's
    #: vocabulary (the emulated GPU emits ids of the embedded tokenizer for any model config)
    input_vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        return max(self.model_config.vocab_size, self.input_vocab_size or 0)

    def add_request(self, rid: str, input_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, params_verified: bool = False) -> None:
        """Validate and queue a request; raises AdmissionError / SamplingParamsError with a clear message.
        `params_verified`: the caller built `params` with SamplingParams.from_dict(d, self.vocab_size),
        which verified them against this vocabulary already (the scheduler process's admission)."""
        vocab = self.vocab_size  # a property: read once, not once per prompt token (1.3 ms for 4k tokens)
        if not params_verified:
            params.verify(vocab)
        bad = next((t for t in input_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise AdmissionError(f"Token id {bad!r} is outside the vocabulary [0, {vocab}).")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self.core.add_request(rid, input_ids, params, seed=seed, eos_ids=self.eos_ids, arrival_time=arrival_time)

    def abort(self, rid: str) -> None:
        self.core.abort(rid)

    def has_work(self) -> bool:
        return self.core.has_unfinished()

    def launch(self) -> int:
        """Hand the executor whatever the core plans now; with overlap scheduling, also the step
        queued behind the running one. Returns how many launches went out."""
        n = 0
        while self.core.can_plan():
            launches = self.core.schedule()
            if not launches:
                break
            for launch in launches:
                self.executor.submit(launch)
            n += len(launches)
        return n

    def step(self, timeout: float | None = None) -> list[RequestUpdate]:
        """One scheduler iteration: plan for idle lanes, launch, and apply whatever finished."""
        updates = self.core.take_updates()
        self.launch()
        if self.core.inflight:
            for res in self.executor.poll(timeout):
                updates.extend(self.core.apply_result(res))
        updates.extend(self.core.take_updates())
        return updates

    def shutdown(self) -> None:
        try:
            self.executor.shutdown()
        finally:
            if self.tp_driver is not None:
                self.tp_driver.shutdown()


def _read_config_file(path: str) -> dict:
    import json

    import yaml

    with open(path) as f:
        text = f.read()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--policy-config {path}: expected a mapping of options")
    return data


__all__ = ["EngineCore", "AdmissionError", "SamplingParamsError"]
