"""Grammar-constrained decoding through xgrammar (SGLang's default grammar backend).

Where things live:
  * `GrammarCompiler` (one per process, built from the tokenizer): compiles a request's grammar
    spec (kind, text) once; compiled grammars are cached by spec (xgrammar's own cache), so the
    second request with the same schema costs a dictionary lookup. The tokenizer manager compiles
    on its worker thread to refuse a bad grammar with a 400 before the request is sent; the
    scheduler process compiles again (its own cache: compiled grammars hold the whole vocabulary
    and are not worth shipping), which happens once per schema and takes ~10 ms for a small one.
  * `GrammarState` (one per request, on the core's Request and handed to executors through
    ReqWork.grammar): the xgrammar matcher. The sampler asks it for the next token's bitmask; the
    executor advances it with every token it samples for the request, in launch order, so a launch
    planned before the previous one's tokens were known (overlap scheduling) still sees the matcher
    after them when it runs. Its stop tokens are the request's own (eos + stop_token_ids), so when
    the grammar is complete only those are allowed and the core finishes the request on one.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sglang_duet.sampling_params import SamplingParamsError

if TYPE_CHECKING:  # the main process imports this module (JSON_OBJECT_SCHEMA, grammar checks): no torch there
    import torch

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")  # SamplingParams fields, SGLang's names
# JSON whitespace, as SGLang: any whitespace between items (xgrammar's any_whitespace) unless
# --constrained-json-disable-any-whitespace asks for the compact form (", " and ": " only). The
# compact form keeps a model that prefers whitespace (small and random models do) from spending its
# max_tokens on it before it closes the object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what SGLang sends for response_format json_object


class GrammarError(SamplingParamsError):
    """A grammar that does not compile; the message starts with the field name (served as a 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} is not a valid grammar: {message}")
        self.field = field


def available() -> bool:
    """Whether xgrammar is installed, found without importing it: it imports torch and transformers
    (~1.5 s of a server's start in the scheduler process, which otherwise needs no transformers)."""
    import importlib.util

    return importlib.util.find_spec("xgrammar") is not None


def _clean(err: Exception) -> str:
    """xgrammar's C++ errors start with '[time] /path/file.cc:line: '; keep the human part."""
    msg = str(err).strip()
    msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", msg)
    msg = msg.replace("Check failed: (error.empty()) is false: ", "")
    return msg.split("\n")[0][:300]


class GrammarCompiler:
    """Compiles grammar specs against one tokenizer; thread-safe, cached per spec.

    The tokenizer's vocabulary table (a few hundred ms for a 50k vocabulary) is built on first use.
    `vocab_size` is the model's logits width (the LM head may be padded past the tokenizer).
    """

    def __init__(self, tokenizer, vocab_size: int, max_threads: int = 1, any_whitespace: bool = True):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_threads = max_threads
        self.any_whitespace = any_whitespace  # JSON: any whitespace between items, or the compact form
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self.tokenizer
                if hasattr(tok, "transformers_tokenizer"):  # the scheduler's DecodeTokenizer: load the full one now
                    tok = tok.transformers_tokenizer()
                info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads)
            return self._compiler

    def compile(self, kind: str, spec: str):
        """A CompiledGrammar for (kind, spec); GrammarError naming the field when it does not compile."""
        if kind not in GRAMMAR_KINDS:
            raise ValueError(f"unknown grammar kind {kind!r}")
        if kind == "json_schema":  # xgrammar's JSON errors are terse; json's say where
            try:
                json.loads(spec)
            except ValueError as e:
                raise GrammarError(kind, f"not JSON ({e})") from None
        comp = self._get()
        try:
            if kind == "json_schema":
                return comp.compile_json_schema(spec, any_whitespace=self.any_whitespace)
            if kind == "regex":
                return comp.compile_regex(spec)
            if kind == "structural_tag":
                return _compile_structural_tag(comp, spec)
            return comp.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(kind, _clean(e)) from None

    def new_state(self, kind: str, spec: str, stop_ids) -> "GrammarState":
        import xgrammar as xgr

        stop = sorted(stop_ids) or None  # none: the tokenizer's eos
        return GrammarState(xgr.GrammarMatcher(self.compile(kind, spec), override_stop_tokens=stop))


def _compile_structural_tag(comp, spec: str):
    """SGLang's `structural_tag` (response_format type "structural_tag", the whole object as JSON):
    either its original form, {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (free
    text; after a trigger, begin + JSON matching the schema + end), or xgrammar's structural tag
    ({"format": {...}}), which SGLang passes through. Malformed ones raise ValueError (a 400)."""
    import xgrammar as xgr

    try:
        tag = json.loads(spec)
    except ValueError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(tag, dict):
        raise ValueError(f"must be an object, got {type(tag).__name__}")
    if "format" in tag:
        return comp.compile_structural_tag(json.dumps({"type": "structural_tag", "format": tag["format"]}))
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ValueError("needs a non-empty list 'structures' (or an xgrammar 'format')")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("needs a non-empty list of strings 'triggers'")
    items = []
    for i, st in enumerate(structures):
        schema = st.get("schema", st.get("schema_")) if isinstance(st, dict) else None
        if not (isinstance(st, dict) and isinstance(st.get("begin"), str) and isinstance(st.get("end"), str)
                and isinstance(schema, (dict, bool))):
            raise ValueError(f"structures[{i}] must have string 'begin' and 'end' and a JSON schema 'schema'")
        items.append(xgr.StructuralTagItem(begin=st["begin"], schema=json.dumps(schema), end=st["end"]))
    return comp.compile_structural_tag(items, triggers)


@dataclass
class GrammarState:
    """One request's position in its grammar (an xgrammar GrammarMatcher)."""

    matcher: object

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance past a sampled token; after the grammar terminated, tokens change nothing (the
        core finishes the request on the stop token; an overlapped step's extra token is dropped)."""
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


def apply_grammar_masks(logits: torch.Tensor, grammars: list) -> None:
    """Mask, in place, the logits of each row with a live grammar to the tokens it allows next.

    grammars: one entry per row (GrammarState or None). The bitmask is filled on the host and
    applied where the logits are (xgrammar has CPU, CUDA and Triton kernels for it).
    """
    rows = [i for i, g in enumerate(grammars) if g is not None and not g.terminated]
    if not rows:
        return
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
    for i in rows:
        grammars[i].fill(bitmask, i)
    if logits.device.type != "cpu":
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)


def grammar_spec(params) -> tuple[str, str] | None:
    """(kind, spec) of a SamplingParams' grammar, or None."""
    for kind in GRAMMAR_KINDS:
        v = getattr(params, kind, None)
        if v is not None:
            return kind, v
    return None


def install_grammars(engine) -> GrammarCompiler | None:
    """Give an EngineCore's SchedulerCore its grammar hook: requests whose params set a grammar get
    a matcher at admission. Where structured output cannot work (no tokenizer, no xgrammar, the
    emulated GPU whose tokens come from no logits) such requests are refused with a clear message."""
    tokenizer = getattr(engine, "tokenizer", None)
    unavailable = None
    if getattr(engine.args, "executor", "model") != "model":
        unavailable = "it needs --executor model"
    elif tokenizer is None:
        unavailable = "this model has no tokenizer"
    elif not available():
        unavailable = "the xgrammar package is not installed"
    any_ws = not getattr(engine.args, "constrained_json_disable_any_whitespace", False)
    compiler = None if unavailable else GrammarCompiler(tokenizer, engine.model_config.vocab_size,
                                                        any_whitespace=any_ws)
    core = engine.core

    def factory(params, stop_ids):
        spec = grammar_spec(params)
        if spec is None:
            return None
        if compiler is None:
            raise SamplingParamsError(f"{spec[0]} cannot be used here: structured output is unavailable "
                                      f"({unavailable}).")
        return compiler.new_state(spec[0], spec[1], stop_ids)

    core.grammar_factory = factory
    return compiler
