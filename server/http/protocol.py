"""OpenAI request bodies (pydantic v2): what clients send.

Request models validate at the boundary: a bad value becomes a 400 whose ``param`` names the
field. Types are strict, as OpenAI's are: ``"10"`` is not a number and ``"yes"`` not a boolean.
Every string, keys included, must be valid Unicode: a JSON escape of a lone UTF-16 surrogate
decodes to a string that no tokenizer or encoder downstream can take. Fields we do not know
(``store``, ``metadata``, ``service_tier``, ...) are ignored, as OpenAI-compatible servers do,
so that every client's extra knobs pass. What the server answers is ``responses.py``'s.
Nothing here knows the engine or the model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from moeserve.server.engine.session_keys import check_key

MAX_STOP = 16  # OpenAI allows 4; vLLM more. Enough for any client, bounded for the matcher.
# Chat-template variables a request may not set through chat_template_kwargs: the server
# passes them itself, so a second value would be ambiguous (and a Python TypeError).
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() also takes "²"


def lone_surrogate_at(value: Any) -> str | None:
    """Where the first string holding a lone surrogate sits in a parsed JSON value.

    Iterative, so a deeply nested body cannot exhaust the interpreter's stack.

    Args:
        value: A parsed JSON value (dicts, lists, strings, numbers).

    Returns:
        A path such as ``messages[0].content`` (``""`` for the value itself), or None when
        every string and key is valid Unicode.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path or name
                stack.append((child, name))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _not_reserved(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    taken = sorted(RESERVED_TEMPLATE_KWARGS & (kwargs or {}).keys())
    if taken:
        raise ValueError(
            f"{', '.join(taken)} cannot be set through chat_template_kwargs; "
            "use the request's own fields"
        )
    return kwargs


# Extra chat-template variables (``enable_thinking``, ...), never the ones the server sets.
TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(_not_reserved)]


class _Lenient(BaseModel):
    """Unknown fields are accepted and ignored; known ones are typed strictly."""

    model_config = ConfigDict(extra="ignore", strict=True)


class _Request(_Lenient):
    """A request body: refused as a whole when any string in it is not valid Unicode."""

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


class StreamOptions(_Lenient):
    """``stream_options``."""

    include_usage: bool = False


class TextPart(_Lenient):
    """A content part; only ``text`` parts are served (checked in ``ChatMessage``)."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # An earlier assistant turn's reasoning, as vLLM takes it back ("reasoning" is its newer
    # name); the template reads it under "reasoning_content" or, gpt-oss's, "thinking".
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> ChatMessage:
        # OpenAI refuses a tool result that does not say which call it answers.
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs a 'tool_call_id'")
        return self

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(content, list):
            for i, part in enumerate(content):
                if part.type != "text":
                    raise ValueError(
                        f"content part {i} has type {part.type!r}; this server accepts only "
                        "'text' parts"
                    )
                if part.text is None:
                    raise ValueError(f"content part {i} of type 'text' has no 'text'")
        return content

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string.

        Returns:
            A plain dictionary.
        """
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "".join(p.text or "" for p in self.content)
        data.setdefault("content", "")
        return data


class SamplingFields(_Request):
    """Generation fields shared by chat and completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: disabled
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)  # the upper bound is the max_n setting (routes/common.py)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    cache_salt: str | None = None  # vLLM's: a prompt-cache pool of its own (prompt_cache.py)
    ignore_eos: bool = False  # extension: benchmarks fix the output length
    min_tokens: int = Field(default=0, ge=0)  # extension

    @field_validator("user", "prompt_cache_key", "cache_salt")
    @classmethod
    def _session_key(cls, value: str | None) -> str | None:
        # They name prompt-cache sessions and files: UTF-8, short, no control characters.
        return None if value is None else check_key(value)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return bias

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return stop

    def wants_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``).

        Returns:
            The flag.
        """
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        """``stop`` as a list.

        Returns:
            The stop strings.
        """
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class FunctionSpec(_Lenient):
    """``tools[i].function``."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Lenient):
    """One tool a model may call."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Lenient):
    """``tool_choice.function``."""

    name: str


class NamedToolChoice(_Lenient):
    """``tool_choice`` naming one function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(_Lenient):
    """``response_format.json_schema``."""

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    """``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: TemplateKwargs = None

    # Field validators, not one model validator, so that the 400's ``param`` names the field.
    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):  # ``logprobs`` is declared (validated) first
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in 'tools'")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {choice.function.name!r}, which is not in "
                    f"tools ({', '.join(names) or 'none given'})"
                )
        return choice

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """``tools`` as plain dictionaries (what chat templates and grammars read).

        Returns:
            The tools, or None.
        """
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def completion_limit(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``.

        Returns:
            The requested limit, or None.
        """
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (legacy)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's legacy default
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists.

        Returns:
            One entry per prompt.
        """
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TokenizeRequest(_Request):
    """``POST /tokenize``: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    tools: list[ToolSpec] | None = None  # rendered by the chat template, as in a chat request
    chat_template_kwargs: TemplateKwargs = None

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]
