"""What crosses the thread boundary: generation requests in, events out.

Plain Python data only (the README's first architecture invariant): no ``mx.array`` ever
appears here, so the asyncio side can hold these objects while the engine thread computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.server.engine.grammar import Constraint
from moeserve.server.engine.sampling import SamplingParams


@dataclass(slots=True)
class GenerationRequest:
    """One request: a tokenised prompt and how to continue it ``n`` times."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1  # independent choices, batched together
    session_key: str | None = None  # prompt-cache session (prompt_cache_key, X-Session-ID, user)
    cache_scope: str = ""  # prompt-cache pool: tenant (+ cache_salt), see session_keys.scope_of
    constraint: Constraint | None = None  # grammar every choice must follow (GrammarCompiler)
    keep_special_ids: frozenset[int] = frozenset()  # special tokens whose text the output keeps


@dataclass(slots=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives."""

    token_id: int
    token: str  # the token's own text (may be a partial character)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass(slots=True)
class DeltaEvent:
    """New output of one choice: text ready to show and the ids that produced it."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class FinishEvent:
    """One choice ended. Usage figures are per choice; the request sums completion tokens."""

    index: int
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the prompt cache


@dataclass(slots=True)
class ErrorEvent:
    """The request failed after it started; the message is safe to show the client."""

    message: str


Event = DeltaEvent | FinishEvent | ErrorEvent
