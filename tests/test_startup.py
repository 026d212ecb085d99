"""Start-up (issue 18): the embedded model's weights mapped from one serving-layout file (no copy,
pages shared between processes), the tokenizer loaded without AutoTokenizer's registry, the
start-up phases recorded in order, and the tokenizer folder the detokenizer may load early.
The embedded folder is played by a tiny model in a temporary cache root ($SGLANG_DUET_CACHE)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.model_loader import embedded, prepared
from sglang_duet.model_loader.loader import load_model, load_tokenizer
from sglang_duet.model_loader.tokenizer_cache import tokenizer_copy_dir
from sglang_duet.server.launcher import tokenizer_folder_known_early
from sglang_duet.server_args import ServerArgs
from sglang_duet.startup_phases import Phases


@pytest.fixture
def embedded_folder(tmp_path, monkeypatch, tiny_model_factory):
    """A tiny model placed where the embedded model's converted folder lives."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(root))
    folder = root / "smollm2-0123456789abcdef"
    shutil.copytree(tiny_model_factory("qwen2"), folder)  # q/k/v biases: every fused tensor kind
    return str(folder)


def _logits(model):
    cfg = model.config
    pool = KVCachePool(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    batch = [([3, 5, 7, 11, 13], 0, list(range(1, 6)), True), ([2, 4], 0, [9, 10], True)]
    with torch.inference_mode():
        return model(ForwardBatch.build(batch), TorchAttentionBackend(), pool)


def _serving_files(folder):
    d = os.path.join(folder, "serving")
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) if os.path.isdir(d) else []


def test_embedded_weights_are_views_of_one_mapped_file(embedded_folder, tmp_path):
    assert embedded.is_embedded_folder(embedded_folder)
    first = load_model(embedded_folder, dtype="float32")  # builds the serving file, then maps it
    second = load_model(embedded_folder, dtype="float32")  # maps the file the first one wrote
    assert first.mapped_file == second.mapped_file and len(_serving_files(embedded_folder)) == 1
    for loaded in (first, second):
        for name, p in loaded.model.named_parameters():
            assert prepared.mapped_files(p) == [loaded.mapped_file], name
        attn = loaded.model.model.layers[0].self_attn
        assert attn.k_proj.weight.data_ptr() == attn.qkv_weight[attn.qkv_sizes[0]:].data_ptr()
        assert attn.v_proj.bias.data_ptr() == attn.qkv_bias[-attn.qkv_sizes[2]:].data_ptr()
    # the same folder outside the cache is an ordinary checkpoint: copied, not mapped, same logits
    plain_dir = tmp_path / "plain"
    shutil.copytree(embedded_folder, plain_dir, ignore=shutil.ignore_patterns("serving"))
    plain = load_model(str(plain_dir), dtype="float32")
    assert plain.mapped_file is None and prepared.mapped_files(plain.model.model.norm.weight) == []
    assert torch.equal(_logits(second.model), _logits(plain.model))


def test_a_bf16_serving_file_is_its_own_and_matches_a_copied_bf16_load(embedded_folder, tmp_path):
    mapped = load_model(embedded_folder, dtype="bfloat16")
    assert mapped.mapped_file.endswith(".safetensors") and "bfloat16" in os.path.basename(mapped.mapped_file)
    assert all(p.dtype == torch.bfloat16 for p in mapped.model.parameters())
    plain_dir = tmp_path / "plain"
    shutil.copytree(embedded_folder, plain_dir, ignore=shutil.ignore_patterns("serving"))
    copied = load_model(str(plain_dir), dtype="bfloat16")
    a, b = mapped.model.serving_tensors(), copied.model.serving_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_checkpoint_or_dtype_gets_its_own_serving_file(embedded_folder):
    files = [os.path.join(embedded_folder, "model.safetensors")]
    f32 = prepared.prepared_path(files, torch.float32)
    assert prepared.prepared_path(files, torch.bfloat16) != f32
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert prepared.prepared_path(files, torch.float32) != f32


def test_a_broken_serving_file_falls_back_to_a_copy(embedded_folder, caplog):
    good = load_model(embedded_folder, dtype="float32")
    expected = _logits(good.model)
    broken = good.mapped_file + ".new"
    with open(broken, "wb") as f:  # not a safetensors file (replaced, not truncated: `good` still maps the old one)
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    os.replace(broken, good.mapped_file)
    with caplog.at_level(logging.WARNING):
        again = load_model(embedded_folder, dtype="float32")
    assert again.mapped_file is None and "loading a private copy" in caplog.text
    assert not any(p.is_meta for p in again.model.parameters())
    assert torch.equal(_logits(again.model), expected)


def test_the_serving_file_is_aligned_and_reads_back_equal(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 16, generator=gen), "b": torch.randn(16, generator=gen).to(torch.bfloat16)}
    path = str(tmp_path / "x.safetensors")
    prepared.write_prepared(tensors, path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert (8 + n) % prepared.ALIGN == 0 and header["b"]["dtype"] == "BF16"
    back = prepared.map_prepared(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert prepared.mapped_files(back["a.weight"]) == [path]


def test_serving_tensors_refuse_a_model_that_does_not_match(embedded_folder):
    model = load_model(embedded_folder, dtype="float32").model
    tensors = model.serving_tensors()
    assert "model.layers.0.self_attn.qkv_weight" in tensors and "model.layers.0.self_attn.q_proj.weight" not in tensors
    with torch.device("meta"):
        fresh = type(model)(model.config, torch.float32)
    missing = dict(tensors)
    missing.pop("model.norm.weight")
    with pytest.raises(ValueError, match="model.norm.weight"):
        fresh.adopt_serving_tensors(missing)
    extra = {**tensors, "model.extra": torch.zeros(1)}
    with torch.device("meta"):
        fresh = type(model)(model.config, torch.float32)
    with pytest.raises(ValueError, match="unexpected"):
        fresh.adopt_serving_tensors(extra)


def test_the_tokenizer_class_autotokenizer_chose_is_remembered_and_used(embedded_folder):
    from transformers import AutoTokenizer

    memo = os.path.join(embedded_folder, "serving", "tokenizer-class.json")
    first = load_tokenizer(embedded_folder)  # AutoTokenizer: picks Qwen2Tokenizer from config.json's model type
    auto = AutoTokenizer.from_pretrained(embedded_folder)
    with open(memo) as f:
        assert json.load(f)["class"] == type(auto).__name__ == type(first).__name__
    again = load_tokenizer(embedded_folder)  # from the memo
    assert type(again) is type(auto)
    text = "Hello world, 123 <|im_end|>"
    assert again(text).input_ids == auto(text).input_ids and again.all_special_ids == auto.all_special_ids
    # the memo is what decides: another class named there is the one loaded
    with open(memo) as f:
        m = json.load(f)
    with open(memo, "w") as f:
        json.dump({**m, "module": "transformers.tokenization_utils_tokenizers", "class": "TokenizersBackend"}, f)
    assert type(load_tokenizer(embedded_folder)).__name__ == "TokenizersBackend"
    with open(memo, "w") as f:  # another transformers version: ask AutoTokenizer again
        json.dump({**m, "transformers": "0.0.1", "class": "TokenizersBackend"}, f)
    assert type(load_tokenizer(embedded_folder)) is type(auto)


def test_phases_are_recorded_in_order():
    ticks = iter([10.0, 10.5, 12.0, 12.25])
    phases = Phases(clock=lambda: next(ticks))
    assert phases.mark("imports") == 0.5 and phases.mark("weights") == 1.5 and phases.mark("tokenizer") == 0.25
    assert phases.names() == ["imports", "weights", "tokenizer"] and phases.total == 2.25
    assert phases.summary() == "imports 0.50 s, weights 1.50 s, tokenizer 0.25 s (total 2.25 s)"


def test_the_loader_reports_its_phases_in_order(embedded_folder):
    loaded = load_model(embedded_folder, dtype="float32")
    assert loaded.phases.names() == ["weights (mapped)", "tokenizer"]
    dummy = load_model(embedded_folder, load_format="dummy", dtype="float32")
    assert dummy.phases.names() == ["weights (dummy)", "tokenizer"] and dummy.mapped_file is None


def test_tokenizer_folder_known_early(embedded_folder, tmp_path):
    args = ServerArgs(model_path=embedded_folder)
    assert tokenizer_folder_known_early(args) is None  # no start has kept a copy yet
    load_model(embedded_folder, dtype="float32")
    copy = tokenizer_folder_known_early(args)
    assert copy == tokenizer_copy_dir(embedded_folder) and not os.path.exists(os.path.join(copy, "config.json"))
    assert load_tokenizer(copy)("a b c").input_ids == load_tokenizer(embedded_folder)("a b c").input_ids
    assert tokenizer_folder_known_early(ServerArgs()) is None  # this cache has no converted default
    assert tokenizer_folder_known_early(ServerArgs(model_path=embedded_folder, tokenizer_path=embedded_folder)) is None
    assert tokenizer_folder_known_early(ServerArgs(model_path=embedded_folder, load_format="gguf")) is None
    assert tokenizer_folder_known_early(ServerArgs(model_path=embedded_folder, executor="emulated")) is None
    other = tmp_path / "other-model"  # not the embedded folder: the scheduler's copy, as before
    shutil.copytree(embedded_folder, other)
    assert tokenizer_folder_known_early(ServerArgs(model_path=str(other))) is None


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _thread_cpus(pid: int) -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir(f"/proc/{pid}/task")}


def test_a_server_logs_its_start_up_phases_in_order_and_pins_its_processes(tiny_model_factory):
    from server_utils import ServerProcess

    from sglang_duet.server.cpu_threads import plan_cpu_threads

    with ServerProcess(["--model-path", tiny_model_factory("llama"), "--dtype", "float32"]) as server:
        log = server.log_tail(100_000)
        line = next(x for x in log.splitlines() if "start-up: " in x)
        names = [p.rsplit(" ", 2)[0].strip() for p in line.split("start-up: ", 1)[1].split(" (total")[0].split(", ")]
        assert names == ["spawn children", "scheduler ready (model loaded)", "detokenizer ready", "HTTP stack imported",
                         "tokenizer manager", "HTTP server up", "warm-up request"]
        assert log.index("CPU threads: ") < log.index("The server is ready")
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) >= 2:
            plan = plan_cpu_threads(allowed, env={"OMP_NUM_THREADS": "1"})  # server_utils runs it with 1 thread
            main = server.proc.pid
            assert _thread_cpus(main) == {plan.other_cpus}
            kids = {pid: _thread_cpus(pid) for pid in _children(main)}
            assert {plan.model_cpus} in kids.values(), kids  # the scheduler: every thread on the model's CPUs
            assert {plan.other_cpus} in kids.values(), kids  # the detokenizer


def test_the_main_process_modules_do_not_import_torch():
    """The HTTP process never runs a model: importing torch there cost ~2 s of CPU per start (it came
    in through constrained/grammar.py, which the protocol and the tokenizer manager import)."""
    code = ("import sys, sglang_duet.launch_server, sglang_duet.server.http_server, "
            "sglang_duet.server.tokenizer_manager, sglang_duet.server.openai_protocol; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_large_cpu_kv_pool_costs_no_memory_until_written():
    """A CPU pool from LAZY_ZEROS_MIN_BYTES up lies on anonymous mapped memory: zero, writable, and
    resident only where tokens were written (torch.zeros wrote every page at start-up)."""
    from sglang_duet.memory.kv_pool import LAZY_ZEROS_MIN_BYTES

    before = _rss_bytes()
    pool = KVCachePool(num_layers=16, num_slots=65536, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    assert pool.buffer.nbytes >= 4 * LAZY_ZEROS_MIN_BYTES  # 512 MiB
    assert _rss_bytes() - before < pool.buffer.nbytes // 8
    loc = torch.tensor([1, 7, 65535])
    pool.set_kv(3, loc, torch.full((3, 4, 64), 2.0), torch.full((3, 4, 64), -1.0))
    k, v = pool.get_kv(3)
    assert torch.equal(k[loc], torch.full((3, 4, 64), 2.0)) and torch.equal(v[loc], torch.full((3, 4, 64), -1.0))
    assert int(pool.buffer[:, 3].count_nonzero()) == 2 * 3 * 4 * 64  # the rest of layer 3 is 0
    assert not pool.buffer[:, [0, 2, 15]].any() and not pool.buffer[:, :, 0].any()  # other layers; the padding slot
    small = KVCachePool(num_layers=2, num_slots=64, num_kv_heads=1, head_dim=8)
    assert small._mapping is None and not small.buffer.any()
