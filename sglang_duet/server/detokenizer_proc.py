"""The detokenizer process: token ids -> text deltas, with stop strings never streamed.

Per request it keeps an IncrementalDetokenizer and how much text was already sent. While a request
runs, a tail of the text that could be the beginning of a stop string is held back; when it
finishes, the text is cut where the matched stop string begins (unless no_stop_trim) and the
held-back rest is released. So the concatenation of the deltas is exactly the final text, and no
delta ever contains (part of) a stop string that ends the request.

Models without a tokenizer (dummy weights) get empty text: ids and meta still flow.
"""
from __future__ import annotations

import logging
import sys

import zmq

from sglang_duet.detokenizer import IncrementalDetokenizer, find_stop_string, holdback_len
from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import IPCPaths, decode_or_drop, error_text, parent_alive, pull_socket, push_socket, send_ready, setup_child

logger = logging.getLogger("sglang_duet.detokenizer")


class _ReqDetok:
    __slots__ = ("det", "stops", "no_stop_trim", "sent", "scanned", "done")

    def __init__(self, tokenizer, reg: io.DetokRegister):
        self.det = IncrementalDetokenizer(tokenizer, reg.prompt_tail, reg.skip_special_tokens,
                                          reg.spaces_between_special_tokens) if tokenizer is not None else None
        self.stops = reg.stop
        self.no_stop_trim = reg.no_stop_trim
        self.sent = 0  # chars of det.text already sent
        self.scanned = 0  # det.text before this was already searched for complete stop strings
        self.done = False  # a stop string was seen: send nothing more until the finish arrives

    def update(self, out: io.TokenOut) -> str:
        if self.det is None:
            return ""
        ids = out.new_ids
        matched = (out.finish_reason or {}).get("matched") if out.finished else None
        if isinstance(matched, int) and not self.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]  # the stop token itself is not part of the text (offline output_text agrees)
        self.det.add(ids)
        if out.finished:
            self.det.flush()
        text = self.det.text
        if out.finished:
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
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
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
            data = self.recv.recv()
            msg = decode_or_drop(io.decode, data)
            if msg is None:
                continue
            if isinstance(msg, io.BatchTokenOut):
                self.send.send(io.encode(self.handle(msg)))
            elif isinstance(msg, io.DetokRegister):
                try:
                    self.reqs[msg.rid] = _ReqDetok(self.tokenizer, msg)
                except Exception:  # noqa: BLE001 - one odd registration must not stop the others
                    logger.exception("registering %s failed", msg.rid)
            else:  # ReqError, SchedulerStats: for the main process as they are
                self.send.send(data)

    def handle(self, batch: io.BatchTokenOut) -> io.BatchStrOut:
        outs = []
        for o in batch.outs:
            st = self.reqs.get(o.rid)
            if st is None:  # cannot happen (register precedes tokens); still never crash on it
                logger.warning("tokens for unknown request %s", o.rid)
                text = ""
            else:
                try:
                    text = st.update(o)
                except Exception:  # noqa: BLE001 - one request's odd tokens must not stop the others
                    logger.exception("detokenizing %s failed", o.rid)
                    text = ""
            if o.finished:
                self.reqs.pop(o.rid, None)
            outs.append(io.StrOut(o.rid, text, o.new_ids, o.logprobs, o.finished, o.finish_reason,
                                  o.prompt_tokens, o.completion_tokens, o.cached_tokens))
        return io.BatchStrOut(outs)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def run_detokenizer_process(log_level: str, paths: IPCPaths, conn) -> None:
    """Starts, imports what it needs, then waits for the tokenizer location (known only once the
    scheduler has loaded the model) before reporting ready."""
    setup_child("detokenizer", log_level, paths.root)
    try:
        import transformers  # noqa: F401 - import while the scheduler loads the model

        tok_dir = conn.recv_bytes().decode() or None
        proc = DetokenizerProcess(paths, tok_dir)
        send_ready(conn, io.ReadyInfo(status="ready"))
    except EOFError:
        sys.exit(1)  # the main process gave up on startup
    except Exception as e:  # noqa: BLE001
        send_ready(conn, io.ReadyInfo(status="error", error=error_text(e)))
        sys.exit(1)
    conn.close()
    try:
        proc.loop()
    except SystemExit:
        pass
    except BaseException:
        logger.exception("detokenizer loop crashed")
        sys.exit(1)
    finally:
        proc.close()
