"""The "hermes_parameters" tool-call format: qwen's markup with "parameters" for "arguments".

``<tool_call>`` NL ``{"name": ..., "parameters": {...}}`` NL ``</tool_call>``: the Hermes / Qwen
JSON-in-``<tool_call>`` markup with the arguments under "parameters", as some fine-tunes'
templates write it. Parsing is the qwen format's (which reads either key); detection and the
constraint grammar differ. Like every format here it knows text only: no tokens, no HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Container

from moeserve.server.text.formats.qwen import QwenFormat

# A JSON key as a template spells it, in a plain or a backslash-escaped string literal.
_PARAMETERS_KEY = re.compile(r'\\?"parameters\\?"\s*:')
_ARGUMENTS_KEY = re.compile(r'\\?"arguments\\?"\s*:')


class HermesParametersFormat(QwenFormat):
    """`<tool_call>{"name": ..., "parameters": {...}}</tool_call>`.

    Detected from a template that writes `<tool_call>` with a `"parameters":` key and no
    `"arguments":` key, so a qwen template (which always names "arguments") is never taken.
    """

    name = "hermes_parameters"
    ARGUMENTS_KEY = "parameters"
    _ARG_KEYS = ("parameters", "arguments")

    @classmethod
    def detect(cls, template: str, vocabulary: Container[str]) -> bool:
        """A `<tool_call>` template whose call object has "parameters", never "arguments"."""
        if "<tool_call>" not in template or "<function=" in template:
            return False
        return bool(_PARAMETERS_KEY.search(template)) and not _ARGUMENTS_KEY.search(template)


FORMAT = HermesParametersFormat  # what the registry (formats/__init__.py) lists
