"""A TokenizerManager with no scheduler behind it: the backend records what the manager sends."""
from __future__ import annotations

from sglang_duet.server import io_struct as io
from sglang_duet.server import tokenizer_manager as tmm
from sglang_duet.server.scheduler_backend import SchedulerBackend
from sglang_duet.server_args import ServerArgs


class RecordingBackend(SchedulerBackend):
    def __init__(self):
        self.reqs, self.aborts = [], []

    def send_generate(self, reqs):
        self.reqs.extend(reqs)

    def send_abort(self, rid):
        self.aborts.append(rid)


def recording_manager() -> tmm.TokenizerManager:
    info = io.ReadyInfo(status="ready", context_length=4096, vocab_size=1000, kv_slots=100000)
    return tmm.TokenizerManager(ServerArgs(), info, RecordingBackend())
