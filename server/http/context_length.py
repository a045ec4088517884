"""The context-length check: whether a prompt and its completion fit in the model's context.

One rule (prompt tokens plus completion tokens at most ``max_model_len``), one wording
(OpenAI's ``context_length_exceeded``, naming ``messages`` or ``prompt``), applied at three
moments:

1. before tokenising: a text longer in UTF-8 bytes than any ``max_model_len`` tokens can hold
   is refused in microseconds, where tokenising it would take seconds (``check_prompt_bytes``);
2. after tokenising: the prompt plus the requested completion, which also sets the default
   completion limit, the room left (``completion_limit``);
3. at admission: the engine's own check, the same rule, mapped here (``from_engine``).

The default completion limit also fits the KV budget (``kv_cache_max_bytes``): a request that
sets no ``max_tokens`` gets at most what one sequence can hold within it, so leaving the limit
out never earns the engine's budget refusal when the prompt itself fits. A requested limit
over the budget is the engine's to refuse (``routes/common.py`` maps it to a 400).

Knows the tokenizer's normalizer and OpenAI's wording; knows nothing of routes or requests.
"""

from __future__ import annotations

import json
from typing import Any

from moeserve.server.engine.scheduler import ContextLengthError
from moeserve.server.http.deps import Runtime
from moeserve.server.http.errors import APIError
from moeserve.server.kv_memory import longest_row


def context_error(prompt: int, completion: int, limit: int, param: str = "messages") -> APIError:
    """400 ``context_length_exceeded`` in OpenAI's wording.

    Args:
        prompt: Prompt tokens.
        completion: Requested completion tokens.
        limit: The model's context length.
        param: ``messages`` (chat) or ``prompt`` (completions).

    Returns:
        The error.
    """
    message = str(ContextLengthError(prompt, completion, limit))
    if param == "prompt":  # the legacy endpoint's wording names the prompt
        message = message.replace("in the messages", "in your prompt").replace(
            "the messages or completion", "your prompt or completion"
        )
    return APIError(400, message, code="context_length_exceeded", param=param)


def from_engine(error: ContextLengthError, param: str = "messages") -> APIError:
    """The engine's refusal at admission, worded as the routes' own check words it.

    Args:
        error: The engine's error.
        param: ``messages`` or ``prompt``.

    Returns:
        The error.
    """
    return context_error(error.prompt_tokens, error.max_tokens, error.max_model_len, param)


def completion_limit(
    runtime: Runtime, prompt_len: int, requested: int | None, param: str = "messages"
) -> int:
    """The completion's token limit: the requested one if it fits, else the room left.

    Args:
        runtime: The runtime (context length, ``default_max_tokens``, the KV budget).
        prompt_len: Prompt tokens.
        requested: The request's limit, or None for the default.
        param: ``messages`` or ``prompt``, for the error.

    Returns:
        The limit, at least 1.

    Raises:
        APIError: 400 ``context_length_exceeded`` when the requested limit does not fit, or
            without one, when the prompt leaves no room at all.
    """
    room = runtime.max_model_len - prompt_len
    if requested is None:
        limit = min(runtime.settings.default_max_tokens, room)
        if limit < 1:
            raise context_error(prompt_len, 1, runtime.max_model_len, param)
        # At least 1: a prompt that alone exceeds the budget gets the engine's 400, which
        # names kv_cache_max_bytes.
        return max(1, min(limit, _kv_room(runtime, prompt_len, limit)))
    if requested > room:
        raise context_error(prompt_len, requested, runtime.max_model_len, param)
    return requested


def _kv_room(runtime: Runtime, prompt_len: int, limit: int) -> int:
    """The most completion tokens, up to ``limit``, that fit the KV budget after the prompt."""
    budget = runtime.kv_budget
    if budget is None:
        return limit
    chunk = runtime.settings.prefill_chunk
    return longest_row(budget.layout, budget.max_bytes, chunk, prompt_len + limit) - prompt_len


# How many times shorter (in UTF-8 bytes) a tokenizer normalizer can make a text. A Unicode
# normal form at most 4 (NFKC maps U+1D400, 4 bytes, to "A"); one that can delete text
# (Strip, StripAccents, BertNormalizer, Precompiled...) has no bound and is left out.
_SHRINK = {"NFC": 4.0, "NFD": 4.0, "NFKC": 4.0, "NFKD": 4.0, "Lowercase": 1.5, "Prepend": 1.0}


def _shrink(spec: dict[str, Any] | None) -> float | None:
    """The most a normalizer (its JSON form) shrinks text, or None when it is unbounded."""
    if spec is None:
        return 1.0
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1.0
        for part in spec.get("normalizers", []):
            one = _shrink(part)
            if one is None:
                return None
            factor *= one
        return factor
    if kind == "Replace" and isinstance(spec.get("pattern"), dict):
        old = str(spec["pattern"].get("String", "")).encode()
        new = str(spec.get("content", "")).encode()
        return max(1.0, len(old) / len(new)) if old and new else None
    return _SHRINK.get(str(kind))


def prompt_byte_limit(runtime: Runtime) -> int | None:
    """The UTF-8 length above which a prompt cannot fit in the context (once per runtime).

    One token stands for at most the longest token's bytes of (normalized) text, so a text
    longer than ``max_model_len`` of those, times what the normalizer can shrink it by, is
    more than ``max_model_len`` tokens: it is refused without rendering it into tokens.

    Args:
        runtime: The runtime (tokenizer, context length).

    Returns:
        The limit in bytes, or None where the tokenizer allows no such bound (a normalizer
        that deletes text, unknown characters fused into one token).
    """
    if "prompt_byte_limit" not in runtime.extra:
        tok = runtime.tokenizer
        backend = getattr(tok, "backend", None)
        normalizer = getattr(backend, "normalizer", None)
        spec = json.loads(normalizer.__getstate__()) if normalizer is not None else None
        shrink = _shrink(spec)
        model = getattr(backend, "model", None)
        if getattr(model, "fuse_unk", False) and not getattr(model, "byte_fallback", False):
            shrink = None
        longest = max((len(tok.token_bytes(i)) for i in range(tok.vocab_size)), default=1)
        # 4: one unknown character (up to 4 bytes) may become one short <unk> token.
        per_token = max(longest, 4)
        limit = None if shrink is None else int(runtime.max_model_len * per_token * shrink)
        runtime.extra["prompt_byte_limit"] = limit
    return runtime.extra["prompt_byte_limit"]


def check_prompt_bytes(runtime: Runtime, text: str, param: str = "messages") -> None:
    """Refuse a prompt that is too long for the context before tokenising it.

    Tokenising megabytes takes seconds; measuring them takes microseconds (``str.isascii``
    is O(1), and a text short enough even at 4 bytes a character needs no encoding).

    Args:
        runtime: The runtime.
        text: The prompt text (rendered chat, or a completions prompt).
        param: ``messages`` or ``prompt``, for the error.

    Raises:
        APIError: 400 ``context_length_exceeded``.
    """
    limit = prompt_byte_limit(runtime)
    if limit is None or len(text) * 4 <= limit:
        return
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return
    limit_tokens = runtime.max_model_len
    what = "your messages are" if param == "messages" else "your prompt is"
    raise APIError(
        400,
        f"This model's maximum context length is {limit_tokens} tokens. However, {what} "
        f"{size} bytes long, more text than {limit_tokens} tokens can hold. Please reduce "
        f"the length of the {param}.",
        code="context_length_exceeded",
        param=param,
    )
