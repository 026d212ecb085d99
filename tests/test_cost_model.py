"""Model configs, hardware specs and the roofline cost model (pure Python, no GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_duet.cost_model.hardware import Curve, HardwareSpec, HardwareSpecError
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


# -- model configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,published", [
    ("qwen3-8b", 8.2e9), ("qwen3-14b", 14.8e9), ("llama-3.1-8b", 8.0e9), ("smollm2-135m", 135e6),
])
def test_model_configs_load_with_published_sizes(name, published):
    cfg = ModelConfig.from_path(str(REPO / "configs" / "models" / f"{name}.json"))
    assert cfg.name == name and cfg.dtype == "bfloat16"
    assert abs(cfg.num_params() / published - 1) < 0.02


def test_model_config_details():
    llama = ModelConfig.from_path(str(REPO / "configs/models/llama-3.1-8b.json"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert llama.rope_theta == 500000.0 and not llama.tie_word_embeddings
    qwen = ModelConfig.from_path(str(REPO / "configs/models/qwen3-8b.json"))
    assert qwen.qk_norm and qwen.head_dim == 128 and qwen.rope_theta == 1e6
    smol = ModelConfig.from_path(str(REPO / "configs/models/smollm2-135m.json"))
    assert smol.tie_word_embeddings and smol.head_dim == 64 and smol.num_key_value_heads == 3


# -- hardware ---------------------------------------------------------------------------------
def test_hardware_load_and_grid():
    h100 = HardwareSpec.load("h100")
    assert h100.total_sms == 132 and h100.sm_granularity == 8
    assert h100.partition_grid() == list(range(8, 121, 8))
    assert HardwareSpec.load(REPO / "configs/hardware/h200.yaml").peak_bandwidth == 4.8e12
    a100 = HardwareSpec.load("a100")
    assert not a100.green_contexts and a100.partition_grid()[-1] == 96
    assert h100.round_partition(20) == 24 and h100.round_partition(1) == 8
    with pytest.raises(HardwareSpecError):
        HardwareSpec.load("b200")
    with pytest.raises(HardwareSpecError):
        h100.compute(133)


def test_hardware_curves_shape():
    hw = HardwareSpec.load("h100")
    full_c, full_b = hw.compute(), hw.bandwidth()
    assert 0.75 <= full_c / hw.peak_flops_bf16 <= 0.82
    assert 0.75 <= full_b / hw.peak_bandwidth <= 0.9
    assert hw.compute(33) == pytest.approx(full_c / 4)  # proportional to SMs
    assert 0.75 <= hw.bandwidth(44) / full_b <= 0.85  # ~80% at a third of the SMs
    prev = 0.0
    for s in range(1, 133):  # non-decreasing
        assert hw.bandwidth(s) >= prev
        prev = hw.bandwidth(s)


def test_curve_interpolation():
    c = Curve(((8, 2.0), (16, 4.0), (32, 5.0)))
    assert c(4) == 1.0 and c(12) == 3.0 and c(24) == 4.5 and c(64) == 5.0


def test_calibration_file_replaces_curves(tmp_path):
    f = tmp_path / "h100-cal.yaml"
    f.write_text(
        "base: h100\n"
        "compute_curve: [[8, 4.0e13], [132, 6.6e14]]\n"
        "bandwidth_curve: [[8, 1.0e12], [32, 2.5e12], [132, 2.9e12]]\n"
        "measured: {date: '2025-01-01', device: 'H100 SXM', driver: '580.65'}\n"
    )
    hw = HardwareSpec.load(f)
    assert hw.name == "h100" and hw.total_sms == 132  # inherited from the base
    assert hw.compute() == 6.6e14 and hw.bandwidth(32) == 2.5e12 and hw.bandwidth(20) == 1.75e12
    assert hw.measured["device"] == "H100 SXM" and hw.source == str(f)
    assert HardwareSpec.load("h100").source == "estimate"


# -- tiny model, hand-computed FLOPs and bytes ------------------------------------------------
def _tiny(family="llama"):
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    return ModelConfig.from_dict({
        "architectures": [arch], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    })


def _tiny_hw(overhead=0.0, flops=100.0):
    # 4 SMs, 100 FLOP/s and 10 B/s on the whole GPU, both proportional to SMs.
    return HardwareSpec.from_dict({
        "name": "toy", "total_sms": 4, "sm_granularity": 1, "min_partition_sms": 1,
        "peak_flops_bf16": flops, "peak_bandwidth": 10.0, "launch_overhead_s": overhead,
        "bandwidth_scaling": [[0, 0.0], [4, 1.0]],
    })


# Hand-computed for one request with q=3 new tokens after c=2 cached; h=8, I=12, V=16,
# 2 heads x 4, 1 KV head, bf16 (2 bytes). (flops, bytes) per operator.
HAND_Q3_C2 = {
    "embed": (0, 2 * 3 * 8 * 2),                            # gather + write 3x8
    "attn_norm": (4 * 3 * 8, (2 * 3 * 8 + 8) * 2),          # 96, 112
    "qkv_proj": (2 * 3 * 8 * 16, (8 * 16 + 3 * 8 + 3 * 16) * 2),  # 768, 400
    "rope": (3 * 3 * 12, 2 * 3 * 12 * 2),                   # q+k = 12 wide: 108, 144
    # 4*2*4 * 3*(2 + 2) = 384; KV read 5 tok x 8 + KV write 3 x 8 + q,o 2 x 3 x 8 = 112 el.
    "attention": (384, 112 * 2),
    "o_proj": (2 * 3 * 8 * 8, (64 + 24 + 24) * 2),          # 384, 224
    "mlp_norm": (96, 112),
    "gate_up_proj": (2 * 3 * 8 * 24, (192 + 24 + 72) * 2),  # 1152, 576
    "act": (4 * 3 * 12, 3 * 3 * 12 * 2),                    # 144, 216
    "down_proj": (2 * 3 * 12 * 8, (96 + 36 + 24) * 2),      # 576, 312
    "final_norm": (96, 112),
    "lm_head": (2 * 1 * 8 * 16, (128 + 8 + 16) * 2),        # 256, 304
}


def test_tiny_breakdown_matches_hand_computation():
    cm = CostModel(_tiny(), _tiny_hw())
    ops = {o.name: o for o in cm.breakdown([(3, 2)])}
    assert set(ops) == set(HAND_Q3_C2)
    for name, (flops, nbytes) in HAND_Q3_C2.items():
        assert ops[name].flops == pytest.approx(flops), name
        assert ops[name].bytes == pytest.approx(nbytes), name
    # Time = max(flops / 100, bytes / 10) per operator (no overhead in this toy).
    expected = sum(max(f / 100.0, b / 10.0) for f, b in HAND_Q3_C2.values())
    assert cm.batch_time([(3, 2)]) == pytest.approx(expected)
    assert all(o.bound == "memory" for o in ops.values())  # 10 B/s is slow next to 100 FLOP/s
    # On 1 SM both rates are a quarter.
    assert cm.batch_time([(3, 2)], sms=1) == pytest.approx(4 * expected)
    # At 1 FLOP/s the GEMMs and attention turn compute-bound; embed (0 FLOPs) cannot.
    slow = CostModel(_tiny(), _tiny_hw(flops=1.0))
    assert slow.batch_time([(3, 2)]) == pytest.approx(sum(max(f, b / 10.0) for f, b in HAND_Q3_C2.values()))
    bounds = {o.name: o.bound for o in slow.breakdown([(3, 2)])}
    assert bounds["qkv_proj"] == bounds["attention"] == "compute" and bounds["embed"] == "memory"


def test_tiny_two_requests_attention_and_lm_head():
    cm = CostModel(_tiny(), _tiny_hw())
    ops = {o.name: o for o in cm.breakdown([(1, 5), (4, 0)])}
    # 32 * (1*(5+1) + 4*(0+2.5)) = 512; KV read 10 tok, write 5 tok (x8), q,o 2x5x8.
    assert ops["attention"].flops == pytest.approx(512)
    assert ops["attention"].bytes == pytest.approx((80 + 40 + 80) * 2)
    assert ops["lm_head"].flops == 2 * 2 * 8 * 16  # one sampled row per request
    assert ops["lm_head"].bytes == (128 + 16 + 32) * 2


def test_tiny_qwen3_qk_norm_and_launch_overhead():
    cm = CostModel(_tiny("qwen3"), _tiny_hw(overhead=1.0))
    ops = {o.name: o for o in cm.breakdown([(3, 2)])}
    assert ops["qk_norm"].flops == 4 * 3 * 12 and ops["qk_norm"].bytes == (2 * 3 * 12 + 8) * 2
    # 14 kernels: embed, 2 norms, qk_norm, qkv, rope, append+attention, o, gate_up, act,
    # down, final norm, lm_head; each pays 1 s here.
    assert sum(o.kernels for o in ops.values()) == 14
    no_ovh = CostModel(_tiny("qwen3"), _tiny_hw()).batch_time([(3, 2)])
    assert cm.batch_time([(3, 2)]) == pytest.approx(no_ovh + 14)


def test_bad_inputs():
    cm = CostModel(_tiny(), _tiny_hw())
    assert cm.batch_time([]) == 0.0 and cm.breakdown([]) == []
    with pytest.raises(ValueError):
        cm.batch_time([(0, 4)])
    with pytest.raises(ValueError):
        cm.batch_time([(1, 4)], bandwidth_share=0.0)
    with pytest.raises(ValueError):
        cm.decode_time(2, [1, 2, 3])


def test_weight_bytes_is_the_zero_token_byte_count():
    for name in ("qwen3-8b", "smollm2-135m"):
        cm = CostModel.load(name, "h100")
        per_token_free = sum(o.bytes for o in cm.breakdown([(1, 0)]))
        assert per_token_free == pytest.approx(cm.weight_bytes(), rel=1e-2)


# -- Qwen3-8B on H100: magnitudes and shape ---------------------------------------------------
@pytest.fixture(scope="module")
def q8():
    return CostModel.load("qwen3-8b", "h100")


def test_decode_batch1_is_weight_bandwidth_bound(q8):
    t = q8.decode_time(1, 1024)
    assert 0.005 <= t <= 0.007
    assert t == pytest.approx(q8.weight_bytes() / q8.hw.bandwidth(), rel=0.15)


def test_prefill_8k_in_published_region(q8):
    assert 0.120 <= q8.prefill_time(8192) <= 0.260
    assert 0.010 <= q8.prefill_time(1024) <= 0.035


def test_decode_keeps_speed_on_few_sms_while_gemm_does_not(q8):
    assert q8.decode_time(1, 1024) / q8.decode_time(1, 1024, sms=32) > 0.7
    full = {o.name: o.time for o in q8.breakdown([(8192, 0)])}
    small = {o.name: o.time for o in q8.breakdown([(8192, 0)], sms=32)}
    assert small["gate_up_proj"] / full["gate_up_proj"] == pytest.approx(132 / 32, rel=0.03)
    bounds = {o.name: o.bound for o in q8.breakdown([(8192, 0)])}
    assert bounds["gate_up_proj"] == bounds["attention"] == "compute"
    assert all(o.bound == "memory" for o in q8.breakdown([(1, 1024)]))


def test_monotonic(q8):
    grid = list(range(8, 133, 4))
    for s_lo, s_hi in zip(grid, grid[1:]):  # fewer SMs -> not faster
        for reqs in ([(1, 2048)] * 16, [(2048, 0)], [(512, 1024), (1, 4096)]):
            assert q8.batch_time(reqs, s_lo) >= q8.batch_time(reqs, s_hi)
    for n in (1, 2, 8, 64, 512):  # more tokens -> not faster
        assert q8.prefill_time(n + 1) >= q8.prefill_time(n)
        assert q8.decode_time(n + 1, 1024) >= q8.decode_time(n, 1024)
    for c in (0, 100, 1000, 10000):  # more context -> not faster
        assert q8.decode_time(8, c + 1) >= q8.decode_time(8, c)
        assert q8.prefill_time(256, cached=c + 1) >= q8.prefill_time(256, cached=c)
    assert q8.decode_time(32, 1024, bandwidth_share=0.7) > q8.decode_time(32, 1024)


def test_every_model_and_hardware_loads():
    for m in ("qwen3-8b", "qwen3-14b", "llama-3.1-8b", "smollm2-135m"):
        for h in ("h100", "h200", "a100"):
            cm = CostModel.load(m, h)
            assert 0 < cm.decode_time(4, 512, sms=cm.hw.partition_grid()[0]) < 1.0


def test_no_torch_import():
    code = ("import sys; import sglang_duet.cost_model.roofline, sglang_duet.workloads; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- the emulator's ground truth (cost_model/truth.py) ----------------------------------------
SHAPES = [
    [(1, 1000)], [(1, 4000)] * 64, [(8192, 0)], [(2048, 6000)], [(512, 100), (1, 3000), (1, 50)],
    [(3000, 0)] + [(1, 2000 + 37 * i) for i in range(100)], [(17, 0), (33, 5), (1, 1)],
]


@pytest.mark.parametrize("sms", [None, 32, 100])
def test_truth_pricer_with_summed_attention_is_the_cost_model(q8, sms):
    from sglang_duet.cost_model.truth import TruthPricer

    p = TruthPricer(q8, per_request_attention=False)
    for shape in SHAPES:
        lc = p.price([(q, c, 1) for q, c in shape], sms)
        assert lc.step_s == [pytest.approx(q8.batch_time(shape, sms), rel=1e-9)]
        assert lc.bytes == pytest.approx(sum(o.bytes for o in q8.breakdown(shape, sms)), rel=1e-9)
        assert lc.device_time(1.0) == pytest.approx(lc.device_s, rel=1e-9)
        for share in (0.9, 0.5):
            # summed per operator over the phases: within a hair of the cost model's own share pricing
            assert lc.device_time(share) == pytest.approx(q8.batch_time(shape, sms, share), rel=1e-9)
    # a k-step decode: step j has one more cached token per row, rows leave after their own steps
    lc = p.price([(1, 1000, 4), (1, 3000, 4), (1, 500, 2)], sms)
    want = [q8.batch_time([(1, 1000 + j), (1, 3000 + j)] + ([(1, 500 + j)] if j < 2 else []), sms) for j in range(4)]
    assert lc.step_s == [pytest.approx(w, rel=1e-9) for w in want]
    assert lc.step_reqs == [3, 3, 2, 2]


def test_truth_attention_per_request(q8):
    from sglang_duet.cost_model.truth import TruthPricer

    per, summed = TruthPricer(q8, True), TruthPricer(q8, False)
    # decode rows are memory-bound one by one: summing their rooflines changes nothing
    decode = [(1, 1000 + 97 * i, 1) for i in range(64)]
    assert per.price(decode, 32).step_s[0] == pytest.approx(summed.price(decode, 32).step_s[0], rel=1e-12)
    # a mixed step: the prefill's attention is compute-bound, the decodes' KV reads are not hidden under it
    mixed = [(4096, 0, 1)] + [(1, 4000, 1)] * 64
    t_per, t_sum = per.price(mixed, None).step_s[0], summed.price(mixed, None).step_s[0]

    def attn(shape):
        return next(o.time for o in q8.breakdown(shape) if o.name == "attention")

    ovh = 2 * q8.L * q8.hw.launch_overhead_s  # the attention kernels' overhead, paid once per step
    apart = attn([(4096, 0)]) + attn([(1, 4000)] * 64) - ovh
    assert t_per - t_sum == pytest.approx(apart - attn([(4096, 0)] + [(1, 4000)] * 64), rel=1e-9)
    assert t_per > t_sum * 1.05


def test_truth_hardware_and_perturbation(q8):
    from sglang_duet.cost_model.truth import TruthConfig, perturbed, truth_cost_model

    assert truth_cost_model(q8, TruthConfig()) is q8  # same hardware: the belief's object
    t = truth_cost_model(q8, TruthConfig(perturb=(0.85, 1.15)))
    assert t.hw.compute(64) == pytest.approx(0.85 * q8.hw.compute(64))
    assert t.hw.bandwidth(16) == pytest.approx(1.15 * q8.hw.bandwidth(16))
    assert t.hw.peak_flops_bf16 == q8.hw.peak_flops_bf16 and q8.hw.compute(64) == HardwareSpec.load("h100").compute(64)
    h200 = truth_cost_model(q8, TruthConfig(hardware="h200"))
    assert h200.hw.name == "h200" and h200.model is q8.model
    assert perturbed(q8.hw) is q8.hw
    # both curves scaled by f: every roofline term by 1/f, the kernel overhead not at all
    f = 0.8
    s = truth_cost_model(q8, TruthConfig(perturb=(f, f)))
    for shape in SHAPES:
        ovh = sum(o.kernels for o in q8.breakdown(shape)) * q8.hw.launch_overhead_s
        assert s.batch_time(shape) == pytest.approx(ovh + (q8.batch_time(shape) - ovh) / f, rel=1e-9)


def test_truth_config_parse_and_checks():
    from sglang_duet.cost_model.truth import TruthConfig

    assert TruthConfig.parse(None) == TruthConfig.parse("on") == TruthConfig()
    off = TruthConfig.parse("off", seed=4)
    assert off == TruthConfig.exact(seed=4) and off.noise_sigma == 0 and off.host_s(100) == 0
    assert not off.per_request_attention and off.contention == "bandwidth"
    t = TruthConfig.parse("hardware=h200,perturb=0.85:1.15,noise=0.05,seed=3,host_us=50:2,switch_us=40,"
                          "contention=none,attention=summed")
    assert (t.hardware, t.perturb, t.noise_sigma, t.seed) == ("h200", (0.85, 1.15), 0.05, 3)
    assert t.host_s(10) == pytest.approx(70e-6) and t.switch_s == pytest.approx(40e-6)
    assert t.contention == "none" and not t.per_request_attention
    assert TruthConfig().host_s(256) == pytest.approx(100e-6 + 256 * 10e-6) and TruthConfig().host_s(0) == 0
    for bad in ("noise=-1", "contention=magic", "perturb=0:1", "colour=blue", "attention=some"):
        with pytest.raises(ValueError):
            TruthConfig.parse(bad)


# -- tensor parallelism (cost_model/tp.py) ----------------------------------------------------
def test_allreduce_formula_values():
    from sglang_duet.cost_model.tp import LinkSpec, allreduce_link_time, allreduce_reduce_time

    link = LinkSpec("test", bandwidth=100e9, latency_s=2e-6)
    # 2(N-1)a + 2(N-1)B/(N B_link): N=4, B=8e6 -> 6*2us + 6*8e6/(4*100e9) = 12us + 120us
    assert allreduce_link_time(8e6, 4, link) == pytest.approx(132e-6)
    assert allreduce_link_time(8e6, 2, link) == pytest.approx(2 * 2e-6 + 2 * 8e6 / (2 * 100e9))
    assert allreduce_link_time(8e6, 1, link) == 0.0
    # 3(N-1)B/(N BW): N=4, B=8e6, 2e12 B/s -> 9e-6
    assert allreduce_reduce_time(8e6, 4, 2e12) == pytest.approx(9e-6)
    assert allreduce_reduce_time(8e6, 1, 2e12) == 0.0


def test_link_read_from_the_hardware_file_with_a_default():
    import yaml

    from sglang_duet.cost_model.tp import LinkSpec

    h100 = LinkSpec.from_hardware(HardwareSpec.load("h100"))
    assert h100.name == "nvlink4" and h100.bandwidth == pytest.approx(450e9 * 0.80)
    assert h100.latency_s == pytest.approx(3e-6)
    assert LinkSpec.from_hardware(HardwareSpec.load("h200")).bandwidth == pytest.approx(360e9)
    assert LinkSpec.from_hardware(HardwareSpec.load("a100")).bandwidth == pytest.approx(300e9 * 0.80)
    # a file without a link: the default
    d = {k: v for k, v in yaml.safe_load((REPO / "configs/hardware/h100.yaml").read_text()).items()
         if not k.startswith("link_")}
    assert HardwareSpec.from_dict(d).link is None
    assert LinkSpec.from_hardware(HardwareSpec.from_dict(d)) == LinkSpec()


def test_tp1_is_the_plain_model_exactly():
    from sglang_duet.cost_model.tp import TPCostModel

    plain, tp1 = CostModel.load("qwen3-8b", "h100"), TPCostModel.load("qwen3-8b", "h100", 1)
    for reqs in ([(4096, 0)], [(1, 2000)] * 32, [(512, 100), (1, 50)]):
        assert tp1.batch_time(reqs) == plain.batch_time(reqs)
        assert tp1.batch_time(reqs, sms=64, bandwidth_share=0.7) == plain.batch_time(reqs, 64, 0.7)
        assert tp1.breakdown(reqs) == plain.breakdown(reqs)
    assert tp1.allreduce_time(4096) == 0.0


def test_tp2_prices_less_compute_per_gpu_plus_the_allreduces():
    from sglang_duet.cost_model.tp import TPCostModel

    plain, tp2 = CostModel.load("qwen3-8b", "h100"), TPCostModel.load("qwen3-8b", "h100", 2)
    reqs = [(4096, 0)]  # compute-bound prefill
    ops1 = {o.name: o for o in plain.breakdown(reqs)}
    ops2 = {o.name: o for o in tp2.breakdown(reqs)}
    # each GPU does half of every GEMM: the compute-bound part of its time halves (launches do not)
    k = ops1["gate_up_proj"].kernels * plain.hw.launch_overhead_s
    assert ops1["gate_up_proj"].bound == "compute"
    assert ops2["gate_up_proj"].time - k == pytest.approx((ops1["gate_up_proj"].time - k) / 2)
    # plus two all-reduces per layer of 4096 x hidden x 2 bytes on the hardware file's link
    B = 4096 * plain.h * 2
    one = 2 * 3e-6 + 2 * B / (2 * 360e9) + 3 * B / (2 * plain.hw.bandwidth())
    assert ops2["allreduce"].time == pytest.approx(2 * plain.L * one)
    assert tp2.batch_time(reqs) == pytest.approx(sum(o.time for o in ops2.values()))
    assert tp2.allreduce_time(4096) < tp2.batch_time(reqs) < plain.batch_time(reqs)
    # the group holds two GPUs' memory
    assert tp2.hw.memory_bytes == 2 * plain.hw.memory_bytes and tp2.hw.total_sms == plain.hw.total_sms
    with pytest.raises(ValueError, match="tp must be >= 1"):
        TPCostModel.load("qwen3-8b", "h100", 0)
