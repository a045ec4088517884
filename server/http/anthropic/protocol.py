"""Anthropic Messages API request bodies (pydantic v2): what Anthropic clients send.

``MessagesRequest`` is ``POST /v1/messages``; ``CountTokensRequest`` (the same conversation
without the generation fields) is ``POST /v1/messages/count_tokens``. Content is a string or
a list of blocks: ``text``, ``tool_use`` / ``thinking`` / ``redacted_thinking`` (assistant),
``tool_result`` (user). Blocks this server cannot take (``image``, ``document``, server tools)
are refused with a 400 that names them, never dropped in silence.

As in ``server/http/protocol.py``: types are strict, every string must be valid Unicode,
and fields we do not know are ignored. Anthropic refuses unknown fields, but its clients send
newer ones than any server knows (Claude Code: ``cache_control`` on blocks, ``betas``,
``context_management``), and ignoring them is what lets those clients work. ``max_tokens``
is required, as Anthropic requires it. Class names follow the ``anthropic`` package's
(``...Param`` for what a client sends). Nothing here knows the engine or OpenAI's shapes:
``translate.py`` maps these bodies into the chat request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from moeserve.server.engine.session_keys import check_key
from moeserve.server.http.protocol import MAX_STOP, lone_surrogate_at

_SUPPORTED = "text, tool_use, tool_result, thinking and redacted_thinking"


class _Strict(BaseModel):
    """Unknown fields (``cache_control``, ``citations``, ...) are ignored; known ones strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextBlockParam(_Strict):
    """``{"type": "text", "text"}``."""

    type: Literal["text"]
    text: str


class ToolUseBlockParam(_Strict):
    """An earlier assistant turn's tool call: its id, the tool's name, the input object."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ThinkingBlockParam(_Strict):
    """An earlier assistant turn's reasoning (its signature is accepted and not checked)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockParam(_Strict):
    """Encrypted reasoning from Anthropic's models: accepted, and left out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str | None = None


class UnsupportedBlockParam(_Strict):
    """Any other block type (``image``, ``document``, ``search_result``, ...): refused."""

    type: str

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedBlockParam:
        raise ValueError(
            f"content blocks of type {self.type!r} are not supported; this server takes "
            f"{_SUPPORTED} blocks (no images or documents)"
        )


def _tag(known: frozenset[str]) -> Any:
    """A discriminator: a block's ``type`` when known, ``unsupported`` for another string."""

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        if not isinstance(kind, str):
            return None  # pydantic reports the custom error below
        return kind if kind in known else "unsupported"

    return Discriminator(
        tag,
        custom_error_type="invalid_block",
        custom_error_message="a content block must be an object with a string 'type'",
    )


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    return "list[blocks]" if isinstance(value, list) else None


def _content(blocks: Any) -> Any:
    """A string or a list of ``blocks``, tagged by which one the value is.

    Tagged, so that a list's errors are not buried under "not a string" (and the
    ``list[...]`` tag is left out of the ``param`` by ``errors._param``).
    """
    return Annotated[
        Annotated[str, Tag("str")] | Annotated[list[blocks], Tag("list[blocks]")],
        Discriminator(
            _content_kind,
            custom_error_type="invalid_content",
            custom_error_message="content must be a string or a list of content blocks",
        ),
    ]


# What a tool result's content may hold (Anthropic allows images there too: refused).
ResultPart = Annotated[
    Annotated[TextBlockParam, Tag("text")] | Annotated[UnsupportedBlockParam, Tag("unsupported")],
    _tag(frozenset({"text"})),
]


class ToolResultBlockParam(_Strict):
    """A tool's answer to the call ``tool_use_id``, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: _content(ResultPart) = ""
    is_error: bool = False

    def text(self) -> str:
        """The result as one string: text parts joined by newlines.

        Returns:
            The text.
        """
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextBlockParam))


Block = Annotated[
    Annotated[TextBlockParam, Tag("text")]
    | Annotated[ToolUseBlockParam, Tag("tool_use")]
    | Annotated[ToolResultBlockParam, Tag("tool_result")]
    | Annotated[ThinkingBlockParam, Tag("thinking")]
    | Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking")]
    | Annotated[UnsupportedBlockParam, Tag("unsupported")],
    _tag(frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})),
]

# The blocks each role may send (Anthropic refuses the others too).
_ROLE_BLOCKS = {
    "user": (TextBlockParam, ToolResultBlockParam),
    "assistant": (
        TextBlockParam,
        ToolUseBlockParam,
        ThinkingBlockParam,
        RedactedThinkingBlockParam,
    ),
}


Content = _content(Block)


class MessageParam(_Strict):
    """One turn of the conversation."""

    role: Literal["user", "assistant"]
    content: Content

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        if isinstance(self.content, list):
            allowed = _ROLE_BLOCKS[self.role]
            for i, block in enumerate(self.content):
                if not isinstance(block, allowed):
                    raise ValueError(
                        f"content[{i}]: a {self.role} message cannot hold a {block.type!r} block"
                    )
        return self


class ToolParam(_Strict):
    """A client tool: ``name``, ``description``, ``input_schema`` (a JSON schema object)."""

    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, data: Any) -> Any:
        # Checked first: a server tool (web_search_..., bash_...) has no input_schema, and
        # "input_schema: field required" would hide the real reason.
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(
                f"tools of type {kind!r} (Anthropic's server tools) are not supported; "
                "give client tools: name, description, input_schema"
            )
        return data


class ToolChoiceParam(_Strict):
    """``tool_choice``: ``auto``, ``any`` (some tool), ``tool`` (the one named) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _tool_is_named(self) -> ToolChoiceParam:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's 'name'")
        return self


class ThinkingParam(_Strict):
    """``thinking``: switches the template's thinking (where it has a switch); no budget."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class MetadataParam(_Strict):
    """``metadata``: ``user_id`` names the prompt-cache session."""

    user_id: str | None = None

    @field_validator("user_id")
    @classmethod
    def _session_key(cls, value: str | None) -> str | None:
        return None if value is None else check_key(value)


class CountTokensRequest(_Strict):
    """``POST /v1/messages/count_tokens``: a conversation, rendered and counted."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            # The path travels in the context: errors.validation_error makes it the param.
            raise PydanticCustomError(
                "lone_surrogate",
                "{path}: a string holds a lone UTF-16 surrogate, which is not valid Unicode",
                {"path": path or "body"},
            )
        return data

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, choice: ToolChoiceParam | None, info: ValidationInfo) -> Any:
        names = [t.name for t in info.data.get("tools") or []]
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise ValueError(f"tool_choice of type {choice.type!r} needs at least one tool")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(
                f"tool_choice names tool {choice.name!r}, which is not in tools "
                f"({', '.join(names)})"
            )
        return choice


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: MetadataParam | None = None
    stream: bool = False

    def session(self) -> str | None:
        """The prompt-cache session named in the body (``metadata.user_id``).

        Returns:
            The key, or None (then ``X-Session-ID`` may name one).
        """
        return self.metadata.user_id if self.metadata else None
