"""Request text -> token ids, with the work per request bounded and kept off the event loop.

One HTTP request must never freeze the server: every stream and /health share the main process's
event loop. So, before any tokenizing or templating starts, the request's size is checked against
bounds that follow from the model (a text longer than context_length x the longest token's
characters cannot fit; a chat with more messages than context tokens cannot either) and against
MAX_REQUEST_CHARS for a whole batch. What passes is tokenized and templated on a worker thread
unless it is small (INLINE_CHARS): the Rust tokenizer releases the GIL, and the Jinja chat template,
which does not, is interrupted every few milliseconds by the interpreter's switch interval, so the
loop keeps answering meanwhile. One worker thread: the work of the requests queues there, in
arrival order, instead of on the loop.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from sglang_duet.server.errors import APIError

# Texts (or chats) up to this many characters are tokenized on the event loop: a thread hop costs
# more than tokenizing them (tens of microseconds).
INLINE_CHARS = 2048
INLINE_MESSAGES = 16
# All the text of one request (a batch of prompts included): 8 M characters is ~2 M tokens.
MAX_REQUEST_CHARS = 8_000_000
TOKENIZE_THREADS = 1

# Names apply_chat_template or its template already binds: as chat_template_kwargs they would be a
# TypeError ("got multiple values") or silently replace the conversation.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "self", "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "add_special_tokens",
})


class InputProcessor:
    def __init__(self, tokenizer, chat_template: str | None, context_length: int, threads: int = TOKENIZE_THREADS):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.context_length = context_length
        # No text can need fewer tokens than chars / (longest token's chars): longer texts are
        # refused before tokenizing them.
        self.max_token_chars = max_token_chars(tokenizer)
        self.encode = fast_encoder(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def run_off_loop(self, fn, *args):
        """Other per-request work (grammar compilation) on the same worker thread, in arrival order."""
        return await self._off_loop(fn, *args)

    # ---- size checks (O(1) or O(fields), before any work) ----------------------------------

    def check_text_len(self, chars: int, param: str) -> None:
        if chars > self.context_length * self.max_token_chars:
            raise APIError(400, f"The input ({chars} characters, so more than {chars // self.max_token_chars} tokens) "
                                f"is longer than the model's context length ({self.context_length} tokens).",
                           param=param, code="context_length_exceeded")

    @staticmethod
    def check_request_chars(chars: int, param: str) -> None:
        if chars > MAX_REQUEST_CHARS:
            raise APIError(413, f"The request holds {chars} characters of {param}; at most {MAX_REQUEST_CHARS} "
                                f"are accepted in one request.", param=param, code="request_too_large")

    # ---- plain text ------------------------------------------------------------------------

    def _need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer; send input_ids instead of text.", param=param)

    def tokenize(self, text: str, param: str = "text", add_special_tokens: bool = True) -> list[int]:
        self._need_tokenizer(param)
        self.check_text_len(len(text), param)
        return self.encode(text, add_special_tokens)

    async def tokenize_async(self, text: str, param: str = "text") -> list[int]:
        return (await self.tokenize_many_async([text], param))[0]

    async def tokenize_many_async(self, texts: list[str], param: str = "text",
                                  add_special_tokens: bool = True) -> list[list[int]]:
        """All texts checked first (so a bad last one costs no work), then tokenized in one job."""
        self._need_tokenizer(param)
        total = 0
        for t in texts:
            self.check_text_len(len(t), param)
            total += len(t)
        self.check_request_chars(total, param)

        def run():
            encode = self.encode
            return [encode(t, add_special_tokens) for t in texts]

        if total <= INLINE_CHARS:
            return run()
        return await self._off_loop(run)

    async def decode_many_async(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        def run():
            return [self.tokenizer.decode(seq, skip_special_tokens=skip_special_tokens) for seq in seqs]

        if sum(len(seq) for seq in seqs) <= INLINE_CHARS // 4:
            return run()
        return await self._off_loop(run)

    # ---- chat ------------------------------------------------------------------------------

    def check_template_kwargs(self, kwargs) -> dict:
        if kwargs is None:
            return {}
        if not isinstance(kwargs, dict):
            raise APIError(400, "chat_template_kwargs must be an object.", param="chat_template_kwargs")
        bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(bad)}: the server sets "
                                f"{'it' if len(bad) == 1 else 'them'} itself.", param="chat_template_kwargs")
        return kwargs

    def apply_chat_template(self, messages: list[dict], template_kwargs: dict | None = None,
                            continue_final_message: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer, so chat completions are unavailable.")
        if not self.chat_template:
            raise APIError(400, "This model has no chat template; use /v1/completions.")
        kwargs = self.check_template_kwargs(template_kwargs)
        chars = message_chars(messages)
        self.check_text_len(chars, "messages")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=not continue_final_message, continue_final_message=continue_final_message,
                **kwargs)
        except Exception as e:  # noqa: BLE001 - a template error is the request's problem
            raise APIError(400, f"Cannot apply the chat template to these messages: {e}", param="messages") from e
        if not isinstance(text, str):
            raise APIError(400, "The chat template did not render text for these messages.", param="messages")
        self.check_text_len(len(text), "messages")
        # The template writes the special tokens itself (bos, role markers).
        return self.encode(text, False)

    async def apply_chat_template_async(self, messages: list[dict], template_kwargs: dict | None = None,
                                        continue_final_message: bool = False) -> list[int]:
        kwargs = self.check_template_kwargs(template_kwargs)
        chars = message_chars(messages)
        self.check_text_len(chars, "messages")
        if chars <= INLINE_CHARS and len(messages) <= INLINE_MESSAGES:
            return self.apply_chat_template(messages, kwargs, continue_final_message)
        return await self._off_loop(self.apply_chat_template, messages, kwargs, continue_final_message)


def message_chars(messages: list[dict]) -> int:
    """Characters of every string a template may render (content, role, name, tool ids, ...)."""
    n = 0
    for m in messages:
        for v in m.values():
            if isinstance(v, str):
                n += len(v)
    return n


# Texts a direct call of the Rust tokenizer must encode exactly as transformers does before it is
# used: special tokens written out, unicode, digits, whitespace runs, an empty string.
_PROBES = ("", " ", "Hello world", "  two  spaces\n\nand\ttabs ", "12345 67.89", "naïve café 日本語 🙂",
           "<|im_start|>user\nhi<|im_end|>", "<s>[INST] x [/INST]</s>", "<|begin_of_text|><|eot_id|>")


def fast_encoder(tokenizer):
    """encode(text, add_special_tokens) -> ids, as `tokenizer.encode` returns them.

    For a transformers fast tokenizer that adds nothing of its own to the Rust tokenizer's encode,
    that is called directly: transformers' encode wraps it in argument checks, a truncation and
    padding reset and a BatchEncoding, about half of the main process's CPU per short prompt.
    Used only when the tokenizer has no truncation, padding or special-token splitting set, its
    class does not override encode, and it gives transformers' ids on the probes; otherwise (and
    for any other tokenizer) transformers' encode."""
    def slow(text: str, add_special_tokens: bool = True) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return slow
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        plain = (type(tokenizer).encode is PreTrainedTokenizerBase.encode
                 and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
                 and backend.truncation is None and backend.padding is None
                 and not getattr(tokenizer, "split_special_tokens", False) and not backend.encode_special_tokens)
    except (ImportError, AttributeError):
        return slow
    if not plain:
        return slow
    rust_encode = backend.encode

    def fast(text: str, add_special_tokens: bool = True) -> list[int]:
        return rust_encode(text, add_special_tokens=add_special_tokens).ids

    try:
        if any(fast(t, sp) != slow(t, sp) for t in _PROBES for sp in (True, False)):
            return slow
    except Exception:  # noqa: BLE001 - an odd tokenizer: transformers' own encode
        return slow
    return fast


def max_token_chars(tokenizer) -> int:
    """Upper bound on the characters one token decodes to (byte-level BPE: one vocab char per byte)."""
    if tokenizer is None:
        return 1 << 30
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - an odd tokenizer: no early length check
        return 1 << 30
    return max(16, longest)
