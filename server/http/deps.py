"""What routes share: the runtime (served model, engine, settings, metrics) as a dependency.

The runtime is built in the app's lifespan (``server/http/app.py``) and stored on ``app.state``;
routes receive it through the ``RuntimeDep`` alias, so tests can build an app around a fake
engine. Nothing here runs MLX.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Protocol, TypeVar

from fastapi import Depends, Request

from moeserve.server.engine.events import Event, GenerationRequest
from moeserve.server.engine.grammar import GrammarCompiler
from moeserve.server.engine.prompt_cache import PromptCache
from moeserve.server.engine.scheduler import KVBudget
from moeserve.server.http.errors import APIError, model_not_found
from moeserve.server.http.metrics import Metrics
from moeserve.server.settings import Settings
from moeserve.server.text.tokenizer import Tokenizer

T = TypeVar("T")


class EngineLike(Protocol):
    """What the API needs from the engine (``server.engine.engine.Engine`` or a fake)."""

    grammar: GrammarCompiler  # compiles constraints, from any thread
    prompt_cache: PromptCache | None  # sessions' KV caches; touched on the engine thread only

    @property
    def healthy(self) -> bool:
        """Whether the engine thread is alive and accepting work."""
        ...

    async def submit(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Admit a request; return its event iterator."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request."""
        ...

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the engine thread between steps; return its result."""
        ...

    def stats(self) -> dict[str, int]:
        """Queue sizes and prompt-cache memory."""
        ...

    def shutdown(self) -> None:
        """Stop the engine thread (the lifespan's end)."""
        ...


@dataclass
class Runtime:
    """Everything a request handler needs."""

    model_id: str
    aliases: list[str]
    tokenizer: Tokenizer
    engine: EngineLike
    max_model_len: int
    created: int
    settings: Settings
    metrics: Metrics
    fingerprint: str = "fp_moeserve"
    tool_format: str = "qwen"  # the tool-call format of its template (server/text/formats)
    chat_template: str | None = None  # the default template's source, for reasoning detection
    # The engine's KV byte budget (None: no byte bound), to cap a default max_tokens with.
    kv_budget: KVBudget | None = None
    # Values the routes work out once per runtime (``context_length.py``: prompt_byte_limit).
    extra: dict[str, int | None] = field(default_factory=dict)
    _vocabulary: dict[str, int] | None = field(default=None, init=False, repr=False)

    def vocabulary(self) -> dict[str, int]:
        """The tokenizer's vocabulary (token text -> id), read once.

        Returns:
            The vocabulary.
        """
        if self._vocabulary is None:
            self._vocabulary = self.tokenizer.backend.get_vocab()
        return self._vocabulary

    def grammar_compiler(self) -> GrammarCompiler:
        """The constrained-decoding compiler for this tokenizer: the engine's.

        Returns:
            The compiler.
        """
        return self.engine.grammar

    def check_model(self, name: str | None) -> None:
        """Refuse a ``model`` field that is neither the served id nor an alias.

        Args:
            name: The request's ``model``.

        Raises:
            APIError: 404 ``model_not_found``.
        """
        if name is not None and name != self.model_id and name not in self.aliases:
            raise model_not_found(name)


def get_runtime(request: Request) -> Runtime:
    """The runtime of the app serving ``request``.

    Args:
        request: The current request.

    Returns:
        The runtime.

    Raises:
        APIError: 503 while the model is not loaded.
    """
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise APIError(503, "the model is still loading", type="server_error", code="not_ready")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
