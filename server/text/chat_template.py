"""Chat templates: rendering a conversation into prompt text the way Hugging Face does.

Knows jinja2 and the sandbox, filters and globals that Hugging Face's
`apply_chat_template` provides (`raise_exception`, `tojson`, `strftime_now`, `namespace`),
where a model directory keeps its templates, and the ChatML fallback used when a model ships
none. `prepare_messages` gives a template its messages the way transformers (5.x) and vLLM do:
an earlier turn's reasoning under every name templates read, and tool-call arguments sent as
JSON text decoded into objects for templates that expect objects. Knows nothing about tokens,
models or HTTP.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The template used when a model ships none. ChatML (`<|im_start|>role\ncontent<|im_end|>\n`),
# with OpenAI-style tools announced in the system turn and tool calls written as
# `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the way Qwen-family models expect.
CHATML_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set turns = messages -%}
{%- if tools -%}
<|im_start|>system
{% if messages and messages[0].role == 'system' -%}
{{ render_content(messages[0].content) }}

{% set turns = messages[1:] -%}
{%- endif -%}
# Tools

You may call the functions described below.
<tools>
{% for tool in tools -%}
{{ tool | tojson }}
{% endfor -%}
</tools>

To call one, reply with its name and arguments as JSON inside <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <arguments-object>}
</tool_call><|im_end|>
{% endif -%}
{%- for message in turns -%}
<|im_start|>{{ message.role }}
{{ render_content(message.content) }}
{%- for call in message.tool_calls or [] -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if message.content or not loop.first %}{{ '\\n' }}{% endif -%}
<tool_call>
{"name": {{ fn.name | tojson }}, "arguments": \
{{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}
</tool_call>
{%- endfor -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


class TemplateError(ValueError):
    """A chat template could not be compiled or rendered for the given messages.

    Raised for template syntax errors, `raise_exception(...)` calls inside a template and
    rendering failures caused by the messages; the API layer reports it as a bad request.
    """


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot render (e.g. roles out of order).
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which changes the prompt; templates
    # are written against Hugging Face's version, a plain `json.dumps` with these options.
    options = {"indent": indent, "separators": separators, "sort_keys": sort_keys}
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, **options)
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"tojson: {exc}") from exc


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    # A template may store attributes on a namespace; refusing underscore names keeps it away
    # from Python internals, as Hugging Face's sandbox does.
    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
        super().__setitem__(name, value)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox Hugging Face uses.

    Args:
        source: The jinja2 template text.

    Returns:
        The compiled template (cached by source text).

    Raises:
        TemplateError: The template does not parse.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc


def load_templates(root: Path, config: dict[str, Any]) -> dict[str, str]:
    """Collect a model's chat templates by name ("default", "tool_use", ...).

    Args:
        root: The model directory.
        config: Its parsed `tokenizer_config.json`.

    Returns:
        Template source by name.
    """
    raw = config.get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates = {t["name"]: t["template"] for t in raw if "name" in t and "template" in t}
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        # Recent Hugging Face releases save the template here, and it wins over the config.
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    if templates and "default" not in templates:
        raise ValueError(f"{root}: chat templates {sorted(templates)} include no 'default'")
    return templates


# Where a message's reasoning may come in; transformers copies it to "reasoning_content" (what
# most templates read) and "thinking" (what gpt-oss's reads), and so does `prepare_messages`.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# A template that tests the arguments' type (`arguments is string`, Kimi's `['arguments'] is
# string`) takes text or an object; one that concatenates them (DeepSeek-V3.1:
# `... + tool['function']['arguments'] + ...`) needs the text.
_TAKES_TEXT = re.compile(
    r"""\barguments\b['"\]]*\s+is\s+(not\s+)?(string|mapping)"""
    r"""|\+\s*[\w.\[\]'"]*\barguments\b|\barguments\b['"\]]*\s*\+"""
)


@functools.lru_cache(maxsize=32)
def wants_argument_objects(source: str) -> bool:
    """Whether a template expects tool-call arguments as objects rather than JSON text.

    OpenAI clients send arguments as JSON text; most templates were written for transformers'
    convention of an object (gpt-oss's applies `tojson` to them, GLM-4.5's iterates them). Text
    stays text only where the template accepts it: it tests the arguments' type, or
    concatenates them as a string.

    Args:
        source: The template text.

    Returns:
        True when arguments given as JSON text should be decoded first.
    """
    return _TAKES_TEXT.search(source) is None


def prepare_messages(messages: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The messages as a template reads them (new dictionaries; the input is not changed).

    A message with reasoning under any of "reasoning_content", "thinking" or "reasoning" gets
    it under "reasoning_content" and, unless it set its own, "thinking", as transformers does.
    When the template expects objects (`wants_argument_objects`), tool-call arguments that are
    JSON text holding an object are decoded; other text is left as it is.

    Args:
        messages: OpenAI-style messages.
        source: The template that will render them.

    Returns:
        The messages to render.
    """
    objects = wants_argument_objects(source)
    prepared = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        calls = message.get("tool_calls")
        if objects and isinstance(calls, list):
            message = {**message, "tool_calls": [_decode_arguments(c) for c in calls]}
        prepared.append(message)
    return prepared


def _decode_arguments(call: Any) -> Any:
    """A tool call whose arguments, if JSON text of an object, became that object."""
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    target = fn if isinstance(fn, dict) else call
    text = target.get("arguments")
    if not isinstance(text, str):
        return call
    try:
        value = json.loads(text)
    except ValueError:
        return call
    if not isinstance(value, dict):
        return call
    decoded = {**target, "arguments": value}
    return {**call, "function": decoded} if target is fn else decoded
