"""API errors, rendered as OpenAI error bodies on every route (native ones included)."""
from __future__ import annotations

import orjson
from starlette.responses import Response

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error"}
RETRY_AFTER_S = 1  # what a 503 (queue full, starting, draining) tells clients to wait before retrying


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}

    def response(self) -> Response:
        # 503 is always temporary here (queue full, starting, shutting down, a child died and a
        # supervisor restarts us): say when to come back, as HTTP and OpenAI clients expect.
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


# SamplingParams field -> the request field a client wrote (OpenAI names where they differ)
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def sampling_error(e: Exception) -> APIError:
    """SamplingParamsError / AdmissionError as a 400; SamplingParams messages start with the field name."""
    from dataclasses import fields

    from sglang_duet.sampling_params import SamplingParams

    msg = str(e)
    first = msg.split(" ", 1)[0]
    names = {f.name for f in fields(SamplingParams)}
    param = _PARAM_NAMES.get(first, first) if first in names else None
    if msg.startswith("Unknown sampling parameter"):
        param = "sampling_params"
    return APIError(getattr(e, "status", 400), msg, param=param)


def json_response(obj, status: int = 200) -> Response:
    # orjson: fast, and NaN/inf logprobs become null instead of invalid JSON.
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")
