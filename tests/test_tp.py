"""Tensor parallelism on CPU (gloo): `--tp-size 2` against `--tp-size 1` and transformers.

Each tp-2 engine spawns one follower process (seconds on a small machine), so the default run
covers three tiny models that between them exercise every sharding path: smollm (Llama, tied
embeddings: the vocab-parallel embedding doubles as the LM head), qwen3 (QK-norm, head_dim !=
hidden / heads, 2 KV heads split over 2 ranks) and a Qwen2 with ONE KV head (replicated on both
ranks) and an odd vocabulary (the last vocab shard is padded).

fp32 all-reduce sums the row-parallel partial products in another order than one matmul, so
logits differ in the last bits; the tiny models are built with clear argmax margins, so greedy
tokens must still be identical (and they are, token for token).
"""
from __future__ import annotations

import time

import pytest
import torch

from sglang_duet.distributed.sharding import ShardSpec, TPLayout
from sglang_duet.models.config import ModelConfig
from test_models import hf_greedy, hf_model

PROMPTS = ["The capital of France is", "Hello world! How", "def add(a, b):\n    return a"]
MAX_NEW = 12
GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0, "logprobs": True}
SEEDED = [{"max_new_tokens": MAX_NEW, "temperature": 0.9, "top_p": 0.95, "seed": 11 + i} for i in range(len(PROMPTS))]


def build_mqa_qwen2(path) -> str:
    """Qwen2 (QKV bias) with 1 KV head and a vocabulary of 385 (odd: not divisible by 2 ranks)."""
    from tiny_models import _config, build_tokenizer
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = _config("qwen2", len(tok) + 1)
    cfg.num_key_value_heads = 1
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def run_engine(path: str, tp: int, faults: bool = False):
    """Greedy and seeded-sampling outputs of PROMPTS, the tokenized prompts and the greedy tokens' logprobs.

    faults (tp > 1): a 3 s collective timeout and 4 s idle between the two generate calls (the
    driver's keepalive must hold the idle follower), then the follower is killed: the next call
    raises instead of hanging in a collective."""
    from sglang_duet.engine import Engine

    extra = {"dist_timeout": 3.0} if faults else {}
    eng = Engine(path, tp_size=tp, max_total_tokens=1024, chunked_prefill_size=8, **extra)
    try:
        outs = eng.generate(PROMPTS, GREEDY)
        greedy = [o["output_ids"] for o in outs]
        logprobs = [lp["logprob"] for o in outs for lp in o["meta_info"]["output_token_logprobs"]]
        if faults:
            time.sleep(4.0)
        sampled = [o["output_ids"] for o in eng.generate(PROMPTS, SEEDED)]
        ids = [eng.tokenizer.encode(p) for p in PROMPTS]
        if tp > 1:  # each rank's KV pool holds its own heads only
            assert eng.core.kv_pool.num_kv_heads == max(1, eng.core.model_config.num_key_value_heads // tp)
        if faults:
            (follower,) = eng.core.tp_driver.procs.values()
            follower.kill()
            follower.join(5)
            t = time.monotonic()
            with pytest.raises(RuntimeError):
                eng.generate(PROMPTS[0], GREEDY)
            assert time.monotonic() - t < 2.0
    finally:
        eng.shutdown()
    return greedy, sampled, ids, logprobs


@pytest.fixture(scope="module")
def tp_models(tiny_model_factory, tmp_path_factory):
    return {"smollm": tiny_model_factory("smollm"), "qwen3": tiny_model_factory("qwen3"),
            "qwen2-mqa": build_mqa_qwen2(tmp_path_factory.mktemp("tp") / "qwen2-mqa")}


@pytest.mark.parametrize("name", ["smollm", "qwen3", "qwen2-mqa"])
def test_tp2_token_exact_with_tp1_and_transformers(tp_models, name):
    path = tp_models[name]
    g1, s1, ids, lp1 = run_engine(path, 1)
    g2, s2, _, lp2 = run_engine(path, 2, faults=name == "qwen2-mqa")
    assert g2 == g1
    # the same numbers up to fp32 summation order (measured: at most ~1e-6 apart)
    assert lp2 == pytest.approx(lp1, abs=1e-4) and len(lp1) == sum(map(len, g1))
    assert s2 == s1  # seeded sampling: the same logits, the same draws (rank 0 samples)
    assert s1 != g1  # the sampling case is not greedy in disguise
    hf = hf_model(path)
    eos = ModelConfig.from_path(path).eos_token_ids[0]
    for prompt, ours in zip(ids, g2):
        assert ours == hf_greedy(hf, prompt, MAX_NEW, eos)[:len(ours)]


# ---- layout (no processes) -----------------------------------------------------------------------

def _cfg(heads=4, kv=2, inter=128, vocab=385, head_dim=16) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=vocab, hidden_size=64,
                       intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=1e4,
                       rope_scaling=None, max_position_embeddings=64, tie_word_embeddings=False,
                       attention_bias=False, qk_norm=False, dtype="float32")


def test_kv_heads_replicated_when_fewer_than_ranks():
    cfg = _cfg(heads=8, kv=2)
    layouts = [TPLayout.of(cfg, r, 4) for r in range(4)]
    assert [(lay.num_heads, lay.num_kv_heads, lay.kv_head_start) for lay in layouts] == [
        (2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)]
    # query heads 2r, 2r+1 belong to KV group (2r) // 4: the KV head this rank holds
    for lay in layouts:
        assert (lay.rank * lay.num_heads) // (8 // 2) == lay.kv_head_start
    assert layouts[3].spec("model.layers.0.self_attn.k_proj.weight", 16) == ShardSpec(0, 16, 32)


def test_shard_specs_and_vocab_padding():
    cfg = _cfg()
    last = TPLayout.of(cfg, 1, 2)
    assert last.vocab_per_rank == 193
    assert last.spec("model.embed_tokens.weight", 16) == ShardSpec(0, 193, 385)  # 192 rows + 1 padding
    assert last.spec("model.layers.0.self_attn.q_proj.weight", 16) == ShardSpec(0, 32, 64)
    assert last.spec("model.layers.0.self_attn.o_proj.weight", 16) == ShardSpec(1, 32, 64)
    assert last.spec("model.layers.0.mlp.down_proj.weight", 16) == ShardSpec(1, 64, 128)
    assert last.spec("model.layers.0.mlp.down_proj.bias", 16) is None  # added once, after the all-reduce
    assert last.spec("model.norm.weight", 16) is None
    assert TPLayout.of(cfg, 0, 1).spec("model.layers.0.self_attn.q_proj.weight", 16) is None


@pytest.mark.parametrize("kw, flag", [({"heads": 6, "kv": 2}, "attention heads"), ({"inter": 102}, "intermediate"),
                                      ({"heads": 12, "kv": 6}, "KV heads"), ({"heads": 12, "kv": 3}, "KV heads")])
def test_uneven_splits_are_refused(kw, flag):
    with pytest.raises(ValueError, match=flag):
        TPLayout.of(_cfg(**kw), 0, 4)


# ---- sharded loading (no processes: a rank's shard is built and loaded without collectives) -------

def write_tiny_gguf(hf_dir: str, path: str) -> str:
    """The tiny llama's safetensors as an F32 GGUF, q/k rows in llama.cpp's permuted layout."""
    import gguf
    from safetensors.torch import load_file

    from sglang_duet.model_loader.gguf_loader import _GLOBAL_MAP, _LAYER_MAP, permute_qk

    cfg = ModelConfig.from_path(hf_dir)
    w = gguf.GGUFWriter(path, "llama")
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    hf_to_gguf = {v: k for k, v in _GLOBAL_MAP.items()}
    for name, t in load_file(f"{hf_dir}/model.safetensors").items():
        if name in hf_to_gguf:
            w.add_tensor(hf_to_gguf[name], t.numpy())
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module, suffix = rest.rsplit(".", 1)
        kind = next(k for k, v in _LAYER_MAP.items() if v == module)
        if kind in ("attn_q", "attn_k"):
            t = permute_qk(t, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{kind}.{suffix}", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "dummy"])
@pytest.mark.parametrize("size", [2, 4])  # 4 ranks > 2 KV heads: each KV head on two ranks
def test_each_rank_loads_its_slice(tiny_model_factory, tmp_path, fmt, size):
    from sglang_duet.distributed.parallel_state import TPGroup
    from sglang_duet.distributed.sharding import shard_tensor
    from sglang_duet.model_loader.loader import load_model

    path = tiny_model_factory("llama")
    if fmt == "gguf":
        path = write_tiny_gguf(path, str(tmp_path / "tiny.gguf"))
    kw = {"load_format": "dummy", "seed": 3} if fmt == "dummy" else {}
    whole = dict(load_model(path, tokenizer=False, **kw).model.named_parameters())
    kv_rows = set()
    for rank in range(size):
        shard = load_model(path, tokenizer=False, tp=TPGroup(rank=rank, size=size), **kw).model
        for name, p in shard.named_parameters():
            want = shard_tensor(whole[name].detach(), shard.weight_shard(name))
            got = p.detach()[:want.shape[0]]
            assert torch.equal(got, want), (fmt, rank, name)
            assert not got.equal(torch.zeros_like(got)) or name.endswith("bias"), name
            if name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
                assert torch.count_nonzero(p.detach()[want.shape[0]:]) == 0  # padding rows
        kv_rows.add(shard.layout.kv_head_start)
        assert shard.model.layers[0].self_attn.k_proj.weight.shape[0] == max(1, 2 // size) * 16
    assert kv_rows == {0, 1}  # every KV head is held somewhere


def test_sglang_flag_names(capsys):
    from sglang_duet.server.args import parse_args

    a = parse_args(["--tensor-parallel-size", "4", "--nnodes", "2", "--node-rank", "1",
                    "--dist-init-addr", "10.0.0.1:5000", "--dist-timeout", "30"])
    assert (a.tp_size, a.nnodes, a.node_rank, a.dist_init_addr, a.dist_timeout) == (4, 2, 1, "10.0.0.1:5000", 30.0)
    assert parse_args(["--nccl-init-addr", "h:1"]).dist_init_addr == "h:1"  # SGLang's older name
    for argv, msg in [(["--tp-size", "3", "--nnodes", "2", "--dist-init-addr", "h:1"], "multiple of --nnodes"),
                      (["--nnodes", "2"], "--dist-init-addr"), (["--node-rank", "1"], "--node-rank 1"),
                      (["--tp-size", "2", "--disaggregation-mode", "prefill"], "--disaggregation-mode prefill")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert msg in capsys.readouterr().err


def test_rendezvous_fails_fast_when_a_follower_is_gone():
    """Rank 0 waits for the others to join only while its followers live (no 600 s wait for a dead one)."""
    from sglang_duet.distributed.parallel_state import init_tp_group
    from server_utils import free_port

    t0 = time.monotonic()

    def follower_dies_after_a_moment():
        if time.monotonic() - t0 > 0.3:
            raise RuntimeError("tensor-parallel rank(s) [1] exited while starting")

    with pytest.raises(RuntimeError, match="exited while starting"):
        init_tp_group(0, 2, f"tcp://127.0.0.1:{free_port()}", "cpu", timeout_s=5,
                      peers_alive=follower_dies_after_a_moment)
    assert time.monotonic() - t0 < 3


# ---- split mode: one pair of process groups per lane ------------------------------------------------

def _cross_lane_rank(rank: int, addr: str, out) -> None:
    """Each rank issues its two lanes' all-reduces in opposite orders: rank 0 lane 1 first (lane 0
    waits for it to finish), rank 1 lane 0 first. On one shared group the first calls would be
    matched with each other (wrong sums, or a hang); each lane's own groups keep them apart."""
    import threading

    from sglang_duet.distributed.parallel_state import destroy_tp_group, init_tp_group

    group = init_tp_group(rank, 2, addr, "cpu", timeout_s=20, lanes=2)
    sums, done, started = {}, threading.Event(), threading.Event()
    value = {(0, 0): 10.0, (0, 1): 1.0, (1, 0): 100.0, (1, 1): 1000.0}  # (rank, lane) -> contribution

    def lane(k: int) -> None:
        group.bind_lane(k)
        if (rank, k) == (0, 0):
            done.wait(20)
        if (rank, k) == (1, 1):
            started.wait(20)
        if (rank, k) == (1, 0):
            started.set()
        sums[k] = group.all_reduce(torch.tensor([value[rank, k]])).item()
        if k == 1:
            done.set()

    threads = [threading.Thread(target=lane, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    out.put((rank, sums, group.lane, group.num_lanes))
    destroy_tp_group(group)


def test_each_lane_has_its_own_process_groups():
    import multiprocessing as mp

    from server_utils import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    addr = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_cross_lane_rank, args=(r, addr, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict((r, (sums, lane, n)) for r, sums, lane, n in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(30)
    # both ranks: lane 0 summed the lane-0 parts, lane 1 the lane-1 parts; an unbound thread runs lane 0
    assert got == {r: ({0: 110.0, 1: 1001.0}, 0, 2) for r in (0, 1)}


def test_bind_lane_refuses_a_lane_the_group_lacks():
    from sglang_duet.distributed.parallel_state import TPGroup

    with pytest.raises(ValueError, match="lane 1: this tensor-parallel group has 1 lane"):
        TPGroup(rank=0, size=2, lanes=(object(),)).bind_lane(1)


def test_split_lanes_under_tp_are_token_exact_with_tp1(tp_models):
    """--tp-size 2 --lanes 2 with a policy that always splits: prefill and decode launches run on
    both lanes at once on every rank, and the tokens equal tp 1's, one lane, aggregated."""
    from sglang_duet.engine import Engine

    path = tp_models["qwen3"]
    prompts = PROMPTS + ["one two three four five six seven"]
    outs = {}
    for tp, lanes, policy in [(1, "1", "aggregated"), (2, "2", "static-split")]:
        eng = Engine(path, tp_size=tp, lanes=lanes, policy=policy, max_total_tokens=8192, chunked_prefill_size=8)
        try:
            outs[tp] = [o["output_ids"] for o in eng.generate(prompts, GREEDY)]
            if tp == 2:
                stats = eng.core.executor.stats
                assert eng.core.tp_driver.group.num_lanes == 2
        finally:
            eng.shutdown()
    assert outs[2] == outs[1]
    assert stats.launches["prefill"] > 0 and stats.launches["decode"] > 0 and stats.launches["aggregated"] == 0
    assert stats.max_lanes_in_flight == 2  # a prefill and a decode launch were in flight together


def test_gguf_tensors_are_dequantised_one_at_a_time(tiny_model_factory, tmp_path, monkeypatch):
    """A rank loading a GGUF holds one whole dequantised tensor at a time, not the checkpoint:
    reading the file dequantises nothing, and each tensor is dequantised when the loader reaches it."""
    from sglang_duet.distributed.parallel_state import TPGroup
    from sglang_duet.model_loader import gguf_loader
    from sglang_duet.model_loader.loader import load_model
    from sglang_duet.models.llama import LlamaForCausalLM

    path = write_tiny_gguf(tiny_model_factory("llama"), str(tmp_path / "tiny.gguf"))
    real, calls = gguf_loader._dequantize, []
    monkeypatch.setattr(gguf_loader, "_dequantize", lambda t: calls.append(t.name) or real(t))
    contents = gguf_loader.read_gguf(path)
    assert calls == []
    tensors = contents.iter_tensors()
    next(tensors)
    assert len(calls) == 1
    assert 1 + sum(1 for _ in tensors) == len(calls) == len(contents.reader.tensors)
    calls.clear()
    seen = []  # dequantisations done when each weight reaches the model

    def load_weights(self, weights):
        for name, _ in weights:
            seen.append(len(calls))

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", load_weights)
    monkeypatch.setattr("sglang_duet.model_loader.loader._prepare_for_inference", lambda *a: None)
    load_model(path, tokenizer=False, tp=TPGroup(rank=1, size=2))
    assert seen == list(range(1, len(seen) + 1))  # the i-th weight arrives right after the i-th dequantisation
