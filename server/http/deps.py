"""What routes share: the runtime (served model, engine, settings, metrics) as a dependency.

The runtime is built in the app's lifespan (``server/http/app.py``) and stored on ``app.state``;
routes receive it through the ``RuntimeDep`` alias, so tests can build an app around a fake
engine. Nothing here runs MLX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from server.http.errors import APIError, model_not_found
from server.http.metrics import Metrics
from server.text.tokenizer import Tokenizer


class EngineLike(Protocol):
    """What the API needs from the engine (``server.engine.engine.Engine`` or a fake)."""

    healthy: bool

    async def submit(self, request: Any) -> Any:
        """Admit a request; return its event iterator."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request."""
        ...

    def stats(self) -> dict[str, int]:
        """Queue sizes."""
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
    settings: Any  # server.settings.Settings
    metrics: Metrics
    fingerprint: str = "fp_moeserve"
    tool_format: str = "qwen"  # the tool-call format of its template (server/text/formats)
    chat_template: str | None = None  # the default template's source, for reasoning detection
    grammar: Any = None  # server.engine.grammar.GrammarCompiler, built on first use
    extra: dict[str, Any] = field(default_factory=dict)

    def vocabulary(self) -> dict[str, int]:
        """The tokenizer's vocabulary (token text -> id), read once.

        Returns:
            The vocabulary.
        """
        if "vocabulary" not in self.extra:
            self.extra["vocabulary"] = self.tokenizer.backend.get_vocab()
        return self.extra["vocabulary"]

    def grammar_compiler(self) -> Any:
        """The constrained-decoding compiler for this tokenizer (created on first use).

        Returns:
            A ``server.engine.grammar.GrammarCompiler``.
        """
        if self.grammar is None:
            self.grammar = getattr(self.engine, "grammar", None)
        if self.grammar is None:
            from server.engine.grammar import GrammarCompiler

            self.grammar = GrammarCompiler(self.tokenizer)
        return self.grammar

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
