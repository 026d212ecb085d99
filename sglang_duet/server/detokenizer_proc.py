"""The detokenizer process: token ids -> text deltas, with stop strings never streamed.

Per request it keeps an IncrementalDetokenizer and how much text was already sent. While a request
runs, a tail of the text that could be the beginning of a stop string is held back; when it
finishes, the text is cut where the matched stop string begins (unless no_stop_trim) and the
held-back rest is released. So the concatenation of the deltas is exactly the final text, and no
delta ever contains (part of) a stop string that ends the request.

Models without a tokenizer (dummy weights) get empty text: ids and meta still flow.

Per step, not per request: a BatchTokenOut (all of a scheduler step's outputs) is detokenized in
one pass, its requests' decode windows through one `BatchDecoder` call, and answered with one
BatchStrOut. When several BatchTokenOuts are already waiting (this process fell behind), they are
handled together and answered with one BatchStrOut, in order.
"""
from __future__ import annotations

import logging
import sys

import zmq

from sglang_duet.detokenizer import (
    BatchDecoder, ByteLevelDetokenizer, ByteLevelTable, IncrementalDetokenizer, find_stop_string, holdback_len,
)
from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import (
    IPCPaths, decode_or_drop, error_text, parent_alive, pull_socket, push_socket, send_ready, setup_child, tune_gc,
)

logger = logging.getLogger("sglang_duet.detokenizer")


MAX_MERGE = 64  # BatchTokenOuts handled together at most when this process is behind


class _ReqDetok:
    __slots__ = ("det", "fast", "stops", "no_stop_trim", "sent", "scanned", "done", "skip")

    def __init__(self, tokenizer, reg: io.DetokRegister, table: ByteLevelTable | None = None):
        # A byte-level tokenizer: its bytes through an incremental UTF-8 decoder (no decode calls);
        # any other: decode windows (IncrementalDetokenizer), batched per step.
        self.fast = ByteLevelDetokenizer(table, reg.skip_special_tokens) if table is not None else None
        self.det = IncrementalDetokenizer(tokenizer, reg.prompt_tail, reg.skip_special_tokens,
                                          reg.spaces_between_special_tokens) \
            if tokenizer is not None and self.fast is None else None
        self.stops = reg.stop
        self.no_stop_trim = reg.no_stop_trim
        self.sent = 0  # chars of det.text already sent
        self.scanned = 0  # det.text before this was already searched for complete stop strings
        self.done = False  # a stop string was seen: send nothing more until the finish arrives
        self.skip = (reg.skip_special_tokens, reg.spaces_between_special_tokens)  # decode options

    def update(self, out: io.TokenOut) -> str:
        """prepare + decode + finish for one output (the batch path does the decodes together)."""
        w = self.prepare(out)
        if w is None:
            return self.finish(out, None, None)
        det = self.det
        return self.finish(out, det._window(det._prefix_offset, det._read_offset), det._window(det._prefix_offset))

    def prepare(self, out: io.TokenOut) -> tuple[list[int], list[int]] | None:
        """Take the output's ids; return the two id windows to decode (None: nothing to decode;
        the byte-level path has its text already)."""
        if self.det is None and self.fast is None:
            return None
        ids = out.new_ids
        if out.finished:
            matched = (out.finish_reason or {}).get("matched")
            if isinstance(matched, int) and not self.no_stop_trim and ids and ids[-1] == matched:
                ids = ids[:-1]  # the stop token itself is not part of the text (offline output_text agrees)
        if self.fast is not None:
            self.fast.add(ids, out.finished)
            return None
        if ids:
            self.det.push(ids)
        return self.det.windows()

    def finish(self, out: io.TokenOut, prefix_text: str | None, new_text: str | None) -> str:
        """The text delta to send, given the decodes of prepare()'s windows."""
        if self.fast is not None:
            text = self.fast.text
        elif self.det is None:
            return ""
        else:
            if prefix_text is not None:
                # add() and, for the last output, flush(): one commit with final=True is the same
                self.det.commit(prefix_text, new_text, out.finished)
            text = self.det.text
        if out.finished:
            matched = (out.finish_reason or {}).get("matched")
            end = len(text)
            if isinstance(matched, str) and not self.no_stop_trim:
                i = text.find(matched)
                if i >= 0:
                    end = i
        elif self.done:
            return ""
        else:
            end = len(text)
            if self.stops:
                # Normally the scheduler finishes a request in the same update that completes a stop
                # string; if its check and ours ever disagree, ours still keeps the stop unsent.
                hit = find_stop_string(text, self.stops, self.scanned)
                self.scanned = len(text)
                if hit is not None:
                    self.done = True
                    end = hit[0]
                else:
                    end -= holdback_len(text, self.stops)
        if end <= self.sent:
            return ""
        delta = text[self.sent:end]
        self.sent = end
        return delta


class DetokenizerProcess:
    def __init__(self, paths: IPCPaths, tokenizer_dir: str | None):
        self.tokenizer = None
        if tokenizer_dir:
            from sglang_duet.model_loader.decode_tokenizer import load_snapshot

            # a decode snapshot (the embedded model's tokenizer copy): its Rust backend, no transformers
            self.tokenizer = load_snapshot(tokenizer_dir)
            if self.tokenizer is None:
                from sglang_duet.model_loader.tokenizer_cache import load_saved_tokenizer

                self.tokenizer = load_saved_tokenizer(tokenizer_dir)
        self.decoder = BatchDecoder(self.tokenizer) if self.tokenizer is not None else None
        # byte-level BPE (SmolLM2, Qwen, Llama 3): O(new tokens) detokenization, no decode calls
        self.table = ByteLevelTable.build(self.tokenizer) if self.tokenizer is not None else None
        self.ctx = zmq.Context(1)
        self.recv = pull_socket(self.ctx, paths.detokenizer_in)
        self.send = push_socket(self.ctx, paths.main_in)
        self.reqs: dict[str, _ReqDetok] = {}

    def loop(self) -> None:
        while True:
            if not self.recv.poll(1000):
                if not parent_alive():
                    return
                continue
            self.handle_pending()

    def handle_pending(self) -> None:
        """Every message waiting now, in order; consecutive token batches answered as one."""
        outs: list[io.StrOut] = []
        merged = 0
        while True:
            try:
                data = self.recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode_or_drop(io.decode, data)
            if msg is None:
                continue
            if isinstance(msg, io.BatchTokenOut):
                outs.extend(self.handle(msg).outs)
                merged += 1
                if merged >= MAX_MERGE:
                    break
            elif isinstance(msg, io.DetokRegister):
                try:
                    self.reqs[msg.rid] = _ReqDetok(self.tokenizer, msg, self.table)
                except Exception:  # noqa: BLE001 - one odd registration must not stop the others
                    logger.exception("registering %s failed", msg.rid)
            else:  # ReqError, SchedulerStats: for the main process as they are, after what came before
                if outs:
                    self.send.send(io.encode(io.BatchStrOut(outs)))
                    outs = []
                self.send.send(data)
        if outs:
            self.send.send(io.encode(io.BatchStrOut(outs)))

    def handle(self, batch: io.BatchTokenOut) -> io.BatchStrOut:
        """Detokenize one step's outputs: every request's windows in one decode call per option set.
        A request listed twice (the scheduler sends one row per request; never trust it) splits
        the message into passes, so each output is decoded after the previous one is applied."""
        outs, seen, start = [], set(), 0
        for k, rid in enumerate(batch.rids):
            if rid in seen:
                outs += self._handle_pass(batch, start, k)
                seen, start = set(), k
            seen.add(rid)
        outs += self._handle_pass(batch, start, len(batch.rids))
        return io.BatchStrOut(outs)

    def _handle_pass(self, batch: io.BatchTokenOut, lo: int, hi: int) -> list[io.StrOut]:
        outs: list[io.StrOut | None] = []  # in row order; None until a decoded row's text is known
        items = []  # the other rows: (position in outs, out, state, windows or None)
        jobs: dict[tuple[bool, bool], list[int]] = {}  # decode options -> indexes into items
        reqs = self.reqs
        StrOut = io.StrOut
        rids, new_ids, finished = batch.rids, batch.new_ids, batch.finished
        lps, cached, ptoks, ctoks = batch.logprobs, batch.cached_tokens, batch.prompt_tokens, batch.completion_tokens
        for i in range(lo, hi):
            st = reqs.get(rids[i])
            w = None
            if st is not None and st.fast is not None and not st.stops and i not in finished:
                # The usual row (byte-level tokenizer, no stop strings, running): its new text is the
                # delta, nothing held back but an incomplete character; its StrOut is made here, in
                # one pass (no TokenOut, no second loop).
                try:
                    text = st.fast.add(new_ids[i])
                    st.sent += len(text)
                except Exception:  # noqa: BLE001 - one request's odd tokens must not stop the others
                    logger.exception("detokenizing %s failed", rids[i])
                    text = ""
                outs.append(StrOut(rids[i], text, new_ids[i], lps.get(i) if lps else None, False, None,
                                   ptoks[i], ctoks[i], cached.get(i, 0) if cached else 0))
                continue
            o = batch.out(i)
            if st is None:  # cannot happen (register precedes tokens); still never crash on it
                logger.warning("tokens for unknown request %s", o.rid)
            else:
                try:
                    w = st.prepare(o)
                except Exception:  # noqa: BLE001 - one request's odd tokens must not stop the others
                    logger.exception("detokenizing %s failed", o.rid)
                    st = None
            if w is not None:
                jobs.setdefault(st.skip, []).append(len(items))
            items.append((len(outs), o, st, w))
            outs.append(None)
        texts: dict[int, tuple[str, str]] = {}
        for (skip, spaces), idx in jobs.items():
            seqs = []
            for i in idx:
                seqs += items[i][3]
            try:
                dec = self.decoder.decode(seqs, skip, spaces)
            except Exception:  # noqa: BLE001 - fall back to one request at a time
                logger.exception("batch decode failed; decoding one by one")
                dec = None
            for k, i in enumerate(idx):
                if dec is not None:
                    texts[i] = (dec[2 * k], dec[2 * k + 1])
        for i, (pos, o, st, w) in enumerate(items):
            text = ""
            if st is not None:
                try:
                    if w is None:
                        text = st.finish(o, None, None)
                    elif i in texts:
                        text = st.finish(o, *texts[i])
                    else:
                        det = st.det
                        text = st.finish(o, det._window(det._prefix_offset, det._read_offset),
                                         det._window(det._prefix_offset))
                except Exception:  # noqa: BLE001 - one request's odd tokens must not stop the others
                    logger.exception("detokenizing %s failed", o.rid)
                    text = ""
            if o.finished:
                reqs.pop(o.rid, None)
            outs[pos] = StrOut(o.rid, text, o.new_ids, o.logprobs, o.finished, o.finish_reason,
                               o.prompt_tokens, o.completion_tokens, o.cached_tokens)
        return outs

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def run_detokenizer_process(log_level: str, paths: IPCPaths, conn) -> None:
    """Starts, imports what it needs, then waits for the tokenizer location (known only once the
    scheduler has loaded the model) before reporting ready."""
    setup_child("detokenizer", log_level, paths.root)
    try:
        if not conn.poll():  # no tokenizer folder known early: import while the scheduler loads the model
            import transformers  # noqa: F401
        tok_dir = conn.recv_bytes().decode() or None
        proc = DetokenizerProcess(paths, tok_dir)
        send_ready(conn, io.ReadyInfo(status="ready"))
    except EOFError:
        sys.exit(1)  # the main process gave up on startup
    except Exception as e:  # noqa: BLE001
        send_ready(conn, io.ReadyInfo(status="error", error=error_text(e)))
        sys.exit(1)
    conn.close()
    tune_gc()
    try:
        proc.loop()
    except SystemExit:
        pass
    except BaseException:
        logger.exception("detokenizer loop crashed")
        sys.exit(1)
    finally:
        proc.close()
