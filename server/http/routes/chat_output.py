"""A chat completion's output in OpenAI's shapes: content, reasoning, tool calls, chunks.

Text from the engine passes through the parser of the model's reasoning format (``<think>``
blocks become ``reasoning_content``) and then, when the request allows tool calls, through
the parser of the model's tool-call format (markup becomes ``tool_calls``); the formats live
in ``server/text/formats``. A tool-call format that splits reasoning itself (harmony's
channels) runs alone, on every response, and its reasoning events become
``reasoning_content``. Reasoning goes out under both names clients read: ``reasoning_content``
and ``reasoning`` (vLLM's newer name). The same assembler serves both the streaming path (each
delta yields ``Delta`` models, which ``ChatChunks`` frames: the role on a choice's first chunk,
an empty final delta carrying ``finish_reason``, the usage chunk) and the non-streaming path
(``message()`` at the end, ``chat_completion`` around it), fed the engine's deltas one by one
either way, so that both count the same tokens and split the text the same way.

Two rules hold for every API that uses the assembler. A response cut by ``max_tokens`` finishes
with ``length``, even after complete calls, and a call the cut left unwritten is dropped: never
a call, never content (``finish(truncated=True)``, ``finish_reason``). ``reasoning_tokens``
counts generated tokens fed while the text was in reasoning, so it can never exceed
``completion_tokens`` (``reasoning_tokens``). It knows OpenAI's shapes and the engine's events;
it does not know HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeserve.server.engine.events import DeltaEvent, FinishEvent, TokenLogprob
from moeserve.server.http.deps import Runtime
from moeserve.server.http.protocol import ChatCompletionRequest
from moeserve.server.http.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    CompletionTokensDetails,
    Delta,
    Envelope,
    FunctionCall,
    FunctionDelta,
    TokenLogprobOut,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from moeserve.server.http.routes.generation import ChoiceOutput, Tally
from moeserve.server.text.formats import (
    ContentDelta,
    ReasoningDelta,
    ReasoningFormat,
    ToolCallArgs,
    ToolCallStart,
    reasoning_format,
    tool_format,
)


@dataclass
class OutputConfig:
    """How a request's text is split (decided once per request)."""

    tool_format: str | None = None  # parse the text in this format; None: no tool-call parser
    single_call: bool = False  # parallel_tool_calls false (or a named function): keep one call
    reasoning: tuple[str, bool] | None = None  # (reasoning format name, starts_inside)
    tools: list[dict[str, Any]] | None = None  # allowed tools (glm45 types values); None: no calls


@dataclass
class ChoiceAssembler:
    """Per-choice parsing state."""

    config: OutputConfig
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0  # generated tokens fed while the text was in reasoning
    _reasoning: ReasoningFormat | None = None
    _tools: Any = None
    _started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.config.reasoning is not None:
            name, inside = self.config.reasoning
            self._reasoning = reasoning_format(name)(starts_inside=inside)
        if self.config.tool_format is not None:
            self._tools = tool_format(self.config.tool_format)(self.config.tools)

    def feed(self, text: str, tokens: int = 0) -> list[Delta]:
        """Take newly generated text; return the OpenAI deltas it completes.

        Args:
            text: Engine text (already cut at stop strings; may be empty).
            tokens: How many generated tokens it came from. They are reasoning tokens when the
                text was in reasoning before or after them: the tokens that open and close a
                block count, the answer's do not. Tokens are counted, never text tokenised
                again (which can find more tokens than were generated).

        Returns:
            Zero or more deltas (without ``role``).
        """
        was_reasoning = self.in_reasoning
        deltas = self._route(*self._split(text, final=False))
        if was_reasoning or self.in_reasoning:
            self.reasoning_tokens += tokens
        return deltas

    @property
    def in_reasoning(self) -> bool:
        """Whether the text so far ends inside reasoning."""
        if self._reasoning is not None and self._reasoning.in_reasoning:
            return True
        return self._tools is not None and self._tools.in_reasoning

    def finish(self, truncated: bool = False) -> list[Delta]:
        """Flush held-back text at the end of the choice.

        Args:
            truncated: The generation was cut (finish reason ``length``): a tool call still
                open is dropped rather than turned back into content (``ToolFormat.finish``).

        Returns:
            The last deltas.
        """
        return self._route(*self._split("", final=True), final=True, truncated=truncated)

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's ``finish_reason`` for the choice, given the engine's.

        Args:
            engine_reason: ``stop``, ``length``, ``abort`` or ``error``.

        Returns:
            ``tool_calls`` when the model ended its turn with calls; otherwise the engine's
            reason (a cut response is ``length`` even after complete calls).
        """
        return "tool_calls" if engine_reason == "stop" and self.tool_calls else engine_reason

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        if final:
            reasoning, content = self._reasoning.feed(text) if text else ("", "")
            more_r, more_c = self._reasoning.finish()
            return reasoning + more_r, content + more_c
        return self._reasoning.feed(text)

    def _route(
        self, reasoning: str, content: str, final: bool = False, truncated: bool = False
    ) -> list[Delta]:
        deltas: list[Delta] = []
        if reasoning:
            self.reasoning.append(reasoning)
            deltas.append(Delta(reasoning_content=reasoning, reasoning=reasoning))
        if self._tools is None:
            if content:
                self.content.append(content)
                deltas.append(Delta(content=content))
            return deltas
        events = self._tools.feed(content) if content else []
        if final:
            events += self._tools.finish(truncated)
        for event in events:
            deltas.extend(self._tool_delta(event))
        return deltas

    def _tool_delta(self, event: Any) -> list[Delta]:
        if isinstance(event, ContentDelta):
            if not event.text:
                return []
            self.content.append(event.text)
            return [Delta(content=event.text)]
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return []
            self.reasoning.append(event.text)
            return [Delta(reasoning_content=event.text, reasoning=event.text)]
        if self.config.single_call and event.index > 0:
            return []  # parallel_tool_calls=false: the first call only
        if isinstance(event, ToolCallStart):
            self._started.add(event.index)
            function = FunctionDelta(name=event.name, arguments="")
            call = ToolCallDelta(index=event.index, id=event.id, type="function", function=function)
            return [Delta(tool_calls=[call])]
        if isinstance(event, ToolCallArgs) and event.text:
            function = FunctionDelta(arguments=event.text)
            return [Delta(tool_calls=[ToolCallDelta(index=event.index, function=function)])]
        return []

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete tool calls (empty when none)."""
        if self._tools is None:
            return []
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in self._tools.calls
        ]
        return calls[:1] if self.config.single_call else calls

    def message(self) -> AssistantMessage:
        """The final assistant message (non-streaming).

        Returns:
            The message: ``content`` null beside tool calls, else a string (maybe empty).
        """
        content, calls = "".join(self.content), self.tool_calls
        reasoning = "".join(self.reasoning) or None
        return AssistantMessage(
            content=content or (None if calls else ""),
            reasoning_content=reasoning,
            reasoning=reasoning,
            tool_calls=calls or None,
        )


def choice_logprobs(
    token_bytes: Callable[[int], bytes], items: list[TokenLogprob]
) -> ChoiceLogprobs:
    """Chat-format ``logprobs`` for some tokens.

    Args:
        token_bytes: The tokenizer's raw bytes of a token id.
        items: From the engine.

    Returns:
        ``{"content": [...]}``.
    """
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(token_bytes(lp.token_id)),
                top_logprobs=[
                    TopLogprob(token=t, logprob=v, bytes=list(token_bytes(i))) for i, t, v in lp.top
                ],
            )
            for lp in items
        ]
    )


def chat_usage(tally: Tally, assemblers: list[ChoiceAssembler]) -> Usage:
    """A chat response's ``usage``.

    Args:
        tally: The request's token counts.
        assemblers: Every choice's assembler, fed to the end.

    Returns:
        The usage; its reasoning tokens are the choices' generated reasoning tokens.
    """
    reasoning = sum(a.reasoning_tokens for a in assemblers)
    details = CompletionTokensDetails(reasoning_tokens=reasoning)
    return Usage.count(
        tally.prompt, tally.completion, tally.cached, completion_tokens_details=details
    )


class ChatChunks:
    """Writes the SSE chunks of one streaming chat completion (a ``generation.ChunkWriter``).

    Args:
        runtime: The runtime (the fingerprint, token bytes for logprobs).
        req: The request.
        rid: The response id.
        config: How the text splits into content, reasoning and tool calls.
    """

    def __init__(
        self, runtime: Runtime, req: ChatCompletionRequest, rid: str, config: OutputConfig
    ) -> None:
        self.runtime = runtime
        self.out = Envelope(
            ChatCompletionChunk, rid, req.model, runtime.fingerprint, req.wants_usage()
        )
        self.include_usage = self.out.include_usage
        self.role_sent: set[int] = set()
        self.choices = {i: ChoiceAssembler(config) for i in range(req.n)}

    def _choice(
        self,
        index: int,
        delta: Delta,
        logprobs: ChoiceLogprobs | None = None,
        finish: str | None = None,
    ) -> str:
        if index not in self.role_sent:  # the first chunk of a choice says who speaks
            self.role_sent.add(index)
            delta.role = "assistant"
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return self.out.write([choice])

    def delta(self, prompt: int, event: DeltaEvent) -> list[str]:
        """The chunks of a choice's new text (a chat has one prompt)."""
        deltas = self.choices[event.index].feed(event.text, len(event.token_ids))
        lp = None
        if event.logprobs:
            lp = choice_logprobs(self.runtime.tokenizer.token_bytes, event.logprobs)
        if not deltas and lp is not None:
            deltas = [Delta(content="")]  # logprobs of tokens whose text is still held back
        return [self._choice(event.index, d, lp if i == 0 else None) for i, d in enumerate(deltas)]

    def finish(self, prompt: int, event: FinishEvent) -> list[str]:
        """A choice's held-back text, then an empty delta with its ``finish_reason``."""
        assembler = self.choices[event.index]
        cut = event.finish_reason == "length"
        out = [self._choice(event.index, d) for d in assembler.finish(truncated=cut)]
        if event.index not in self.role_sent:  # finished without any text: still say who spoke
            out.append(self._choice(event.index, Delta(content="")))
        reason = assembler.finish_reason(event.finish_reason)
        out.append(self._choice(event.index, Delta(), finish=reason))
        return out

    def usage(self, tally: Tally) -> str:
        """The usage chunk: no choices."""
        return self.out.write([], chat_usage(tally, list(self.choices.values())))


def chat_completion(
    runtime: Runtime,
    req: ChatCompletionRequest,
    rid: str,
    config: OutputConfig,
    outputs: list[ChoiceOutput],
    tally: Tally,
) -> ChatCompletion:
    """The non-streaming chat response.

    Args:
        runtime: The runtime.
        req: The request.
        rid: The response id.
        config: How the text splits into content, reasoning and tool calls.
        outputs: Each choice's output (``generation.collect_choices``).
        tally: The request's token counts.

    Returns:
        The response.
    """
    choices, assemblers = [], []
    for i, output in enumerate(outputs):
        assembler = ChoiceAssembler(config)
        for delta in output.deltas:  # as streamed: the same split, the same token counts
            assembler.feed(delta.text, len(delta.token_ids))
        assembler.finish(truncated=output.finish.finish_reason == "length")
        assemblers.append(assembler)
        logprobs = None
        if req.logprobs:
            logprobs = choice_logprobs(runtime.tokenizer.token_bytes, output.logprobs)
        reason = assembler.finish_reason(output.finish.finish_reason)
        choices.append(
            ChatChoice(
                index=i, message=assembler.message(), logprobs=logprobs, finish_reason=reason
            )
        )
    return ChatCompletion(
        id=rid,
        created=int(time.time()),
        model=req.model,
        system_fingerprint=runtime.fingerprint,
        choices=choices,
        usage=chat_usage(tally, assemblers),
    )
