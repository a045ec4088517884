"""Responses API request bodies (pydantic v2): what ``POST /v1/responses`` accepts.

Strict, as the chat request is (``server/http/protocol.py``'s bases: ``"10"`` is no number,
every string must be valid Unicode, unknown fields are ignored). Input items are one flat
model whose ``type`` says which fields it needs, rather than a tagged union: pydantic puts a
union's tag into an error's location, and a 400's ``param`` should read ``input[2].call_id``.
For the same reason a list comes first in every ``list | str`` union: the location of a list
error reads cleanly (``list[...]`` steps are dropped from ``param``), a ``str`` one would not.

What is served: text in, text / JSON / function calls out. Images, files, audio, built-in
tools (web search, file search, ...) and item references are refused with a 400 that says
so. Nothing here knows the engine, the chat request or the store.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from moeserve.server.engine.session_keys import check_key
from moeserve.server.http.protocol import _Lenient, _Request

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
TEXT_PARTS = ("input_text", "output_text")  # a message's text parts
REASONING_PARTS = ("summary_text", "reasoning_text")  # a reasoning item's parts
MAX_METADATA = 16  # OpenAI's bounds on metadata: pairs, key and value lengths
MAX_METADATA_KEY, MAX_METADATA_VALUE = 64, 512


class ContentPart(_Lenient):
    """A part of a message's content, a tool output or a reasoning item (checked by its item)."""

    type: str
    text: str | None = None


def _texts(parts: list[ContentPart] | str, allowed: tuple[str, ...], what: str) -> str:
    """The text of a content value: a string, or text parts of the allowed types joined.

    Raises:
        ValueError: A part of another type (an image, a file), or one without text.
    """
    if isinstance(parts, str):
        return parts
    for i, part in enumerate(parts):
        if part.type not in allowed:
            raise ValueError(
                f"{what} part {i} has type {part.type!r}; this server accepts only "
                f"{' and '.join(repr(t) for t in allowed)} parts (text only)"
            )
        if part.text is None:
            raise ValueError(f"{what} part {i} of type {part.type!r} has no 'text'")
    return "".join(p.text or "" for p in parts)


class InputItem(_Lenient):
    """One item of ``input``: a message, a function call, its output, or reasoning.

    A message may leave out ``type`` (OpenAI's "easy input message").
    """

    type: str = "message"
    id: str | None = None  # an earlier output item's id: accepted, not needed
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: list[ContentPart] | str | None = None  # message text, or reasoning text parts
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: list[ContentPart] | str | None = None
    summary: list[ContentPart] | None = None

    @field_validator("type")
    @classmethod
    def _served_type(cls, kind: str) -> str:
        if kind not in ITEM_TYPES:
            raise ValueError(
                f"input items of type {kind!r} are not supported; this server accepts "
                f"{', '.join(repr(t) for t in ITEM_TYPES)} items"
            )
        return kind

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        needed = {
            "message": ("role", "content"),
            "function_call": ("call_id", "name", "arguments"),
            "function_call_output": ("call_id", "output"),
            "reasoning": (),
        }[self.type]
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type!r} item needs {', '.join(repr(f) for f in missing)}")
        self.text()  # refuses parts that are not text
        return self

    def text(self) -> str:
        """The item's text: a message's content, a tool output, or the reasoning.

        Returns:
            The text ("" for a function call).

        Raises:
            ValueError: A part that is not text.
        """
        if self.type == "message":
            return _texts(self.content or "", TEXT_PARTS, "content")
        if self.type == "function_call_output":
            return _texts(self.output or "", TEXT_PARTS, "output")
        if self.type == "reasoning":
            # The full reasoning when the item has it, else its summary.
            content = _texts(self.content or [], REASONING_PARTS, "content")
            return content or _texts(self.summary or [], REASONING_PARTS, "summary")
        return ""


class FunctionTool(_Lenient):
    """``tools[i]``: a function the model may call (no other kind of tool is served)."""

    type: str
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _function_only(cls, kind: str) -> str:
        if kind != "function":
            raise ValueError(
                f"tools of type {kind!r} are not supported; this server runs only 'function' tools"
            )
        return kind

    @model_validator(mode="after")
    def _named(self) -> FunctionTool:
        if self.name is None:
            raise ValueError("a function tool needs a 'name'")
        return self


class ToolChoiceFunction(_Lenient):
    """``tool_choice`` naming one function: ``{"type": "function", "name": ...}``."""

    type: Literal["function"] = "function"
    name: str


class TextFormat(_Lenient):
    """``text.format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a text format of type 'json_schema' needs a 'schema'")
        return self


class TextConfig(_Lenient):
    """``text``: the output's format (``verbosity`` is accepted, and does nothing here)."""

    format: TextFormat = TextFormat()
    verbosity: str | None = None


class ReasoningConfig(_Lenient):
    """``reasoning``: accepted and echoed; the model reasons as its template makes it."""

    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Request):
    """``POST /v1/responses``."""

    model: str
    input: list[InputItem] | str = Field(default_factory=list)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceFunction | Literal["none", "auto", "required"] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    reasoning: ReasoningConfig | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    seed: int | None = None  # extension, as in chat completions

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_items(cls, value: Any) -> Any:
        # Said here, or the 400 would name only the list branch of the union.
        if not isinstance(value, (str, list)):
            raise ValueError("input must be a string or a list of items")
        return value

    @field_validator("user", "prompt_cache_key")
    @classmethod
    def _session_key(cls, value: str | None) -> str | None:
        # They name prompt-cache sessions, as in chat: UTF-8, short, no control characters.
        return None if value is None else check_key(value)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _served_choice(cls, choice: Any) -> Any:
        # Checked before the union so that the 400 says what is wrong, not which union
        # member failed: other tool kinds (allowed_tools, web_search, mcp, ...) are refused.
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        if not isinstance(choice, dict):
            raise ValueError(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'name': ...}"
            )
        kind = choice.get("type")
        if kind != "function":
            raise ValueError(
                f"tool_choice of type {kind!r} is not supported; use 'none', 'auto', "
                "'required' or {'type': 'function', 'name': ...}"
            )
        if not isinstance(choice.get("name"), str):
            raise ValueError("tool_choice of type 'function' needs a 'name' string")
        return choice

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in 'tools'")
        if isinstance(choice, ToolChoiceFunction):
            names = [t.name for t in tools]
            if choice.name not in names:
                raise ValueError(
                    f"tool_choice names function {choice.name!r}, which is not in tools "
                    f"({', '.join(str(n) for n in names) or 'none given'})"
                )
        return choice

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} metadata pairs are allowed")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"metadata keys are at most {MAX_METADATA_KEY} characters and values "
                    f"at most {MAX_METADATA_VALUE}"
                )
        return metadata

    def input_items(self) -> list[InputItem]:
        """``input`` as items: a string is one user message.

        Returns:
            The items.
        """
        if isinstance(self.input, str):
            return [InputItem(type="message", role="user", content=self.input)]
        return list(self.input)

    def text_format(self) -> TextFormat:
        """``text.format``, plain text when unset.

        Returns:
            The format.
        """
        return self.text.format if self.text is not None else TextFormat()
