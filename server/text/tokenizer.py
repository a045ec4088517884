"""Text in, token ids out, and back: tokenizers, chat templates, special tokens and EOS ids.

This module knows a Hugging Face model directory's tokenizer files (`tokenizer.json`,
`tokenizer_config.json`, `chat_template.jinja`, `special_tokens_map.json`) plus the end-of-
sequence ids in `generation_config.json` and `config.json`. It renders chat templates with
jinja2 in the same sandbox, filters and globals that Hugging Face's `apply_chat_template`
provides, and hands out a streaming detokenizer per generation. Turning a stream of generated
ids into text without ever emitting half a character lives in `detokenizer.py`, and finding
stop strings that span token boundaries in `stop_strings.py`; both classes are re-exported
here, where their users import them from.

It does not know the model, sampling, sessions or HTTP. Messages reach the template as
`chat_template.prepare_messages` gives them: as given, plus reasoning aliases and, for templates
that want them, tool-call arguments decoded from JSON text. Only the fast-tokenizer format
(`tokenizer.json`) is read; a directory that ships only `tokenizer.model` or `vocab.json` +
`merges.txt` is refused.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from moeserve.server.text.chat_template import (
    CHATML_TEMPLATE,
    TemplateError,
    compile_chat_template,
    load_templates,
    prepare_messages,
)
from moeserve.server.text.detokenizer import StreamingDetokenizer

# Re-exported: the engine's output stage and the Anthropic API import it from this module.
from moeserve.server.text.stop_strings import StopMatcher as StopMatcher

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # Special tokens are stored either as plain strings or as serialised AddedToken objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


# Tokenizer classes whose text pipeline transformers (5.x) builds itself from
# tokenizer_config.json, replacing what their tokenizer.json says.
_METASPACE_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})


def _as_transformers_builds(
    backend: tokenizers.Tokenizer, config: dict[str, Any]
) -> tokenizers.Tokenizer:
    """Give a SentencePiece-style BPE tokenizer the pre-tokenizer transformers 5 gives it.

    Older `tokenizer.json` files of Llama-class tokenizers (Mixtral-8x7B-Instruct, Llama 2)
    prepend "▁" to every piece of text with a normalizer, so the text after a special token,
    `<s> [INST]`, becomes "▁▁[INST]": pieces `▁`, `▁[`, where the model was trained on `▁[`
    alone (mistral-common, sentencepiece and transformers 5 all give that). transformers 5
    ignores the file's normalizer and pre-tokenizer for these classes and uses a `Metaspace`
    pre-tokenizer that turns spaces into "▁" and prepends one only where none is: to every
    piece of text (`legacy: true`) or to the text's start only (`legacy` false or absent), and
    never when `add_prefix_space` is false. This does the same, so prompts tokenize as they do
    there. Byte-level BPE tokenizers that name a Llama class (DeepSeek-V3's) are left alone.

    Args:
        backend: The tokenizer as `tokenizer.json` describes it (changed in place).
        config: The parsed `tokenizer_config.json`.

    Returns:
        `backend`.
    """
    model = backend.model
    if config.get("tokenizer_class") not in _METASPACE_CLASSES or not (
        isinstance(model, tokenizers.models.BPE) and model.byte_fallback
    ):
        return backend
    if config.get("add_prefix_space") is False:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy", False) else "first"
    backend.normalizer = None
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=scheme, split=False
    )
    return backend


class Tokenizer:
    """A model's tokenizer, special tokens and chat templates.

    Args:
        backend: The `tokenizers.Tokenizer` that does the encoding and decoding.
        bos_token: Beginning-of-sequence token text, if the model has one.
        eos_token: End-of-sequence token text from the tokenizer config.
        pad_token: Padding token text, if any.
        chat_templates: Templates by name; empty means the ChatML default (`CHATML_TEMPLATE`).
        extra_eos_token_ids: Further ids that end generation (generation and model configs).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_templates: dict[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token_id = self._token_id(bos_token)
        self.pad_token_id = self._token_id(pad_token)
        eos_id = self._token_id(eos_token)
        self.eos_token_ids: frozenset[int] = frozenset(
            [*([] if eos_id is None else [eos_id]), *extra_eos_token_ids]
        )
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.chat_templates = dict(chat_templates or {})
        if not self.chat_templates:
            logger.info("no chat template found; using the ChatML default")
        # Compile now so that a broken template fails at load, not on the first request.
        self._compiled = {n: compile_chat_template(s) for n, s in self.chat_templates.items()}
        self._compiled.setdefault("default", compile_chat_template(CHATML_TEMPLATE))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a model directory in Hugging Face layout.

        Args:
            path: Directory holding `tokenizer.json` and, optionally, `tokenizer_config.json`,
                `chat_template.jinja`, `special_tokens_map.json`, `generation_config.json` and
                `config.json`.

        Returns:
            The loaded tokenizer.

        Raises:
            FileNotFoundError: The directory has no `tokenizer.json`.
            ValueError: A JSON file is malformed or the named templates have no default.
            TemplateError: A chat template does not compile.
        """
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (only fast tokenizers load)")
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")

        def special(name: str) -> str | None:
            return _token_text(config.get(name)) or _token_text(special_map.get(name))

        extra_eos = [
            *_as_ids(_read_json(root / "generation_config.json").get("eos_token_id")),
            *_as_ids(_read_json(root / "config.json").get("eos_token_id")),
        ]
        return cls(
            _as_transformers_builds(tokenizers.Tokenizer.from_file(str(file)), config),
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            pad_token=special("pad_token"),
            chat_templates=load_templates(root, config),
            extra_eos_token_ids=extra_eos,
        )

    def add_eos_tokens(self, texts: Iterable[str]) -> None:
        """Also end generation at these tokens (a format's turn ends, e.g. harmony's ``<|call|>``).

        Args:
            texts: Token texts; those the vocabulary lacks are ignored.
        """
        ids = (self.backend.token_to_id(t) for t in texts)
        self.eos_token_ids |= frozenset(i for i in ids if i is not None)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            logger.warning("special token %r is not in the vocabulary; ignoring it", token)
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included.

        The model's embedding table may be larger (padded); never smaller.
        """
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Turn text into token ids.

        Args:
            text: The text. Special-token text in it (e.g. `<|im_end|>`) becomes that token.
            add_special_tokens: Apply the tokenizer's post-processor (e.g. prepend BOS).

        Returns:
            The token ids.
        """
        # The batch entry point releases the GIL while it works (``encode`` holds it: seconds
        # for a megabyte), so a long prompt tokenised in a worker thread leaves the event
        # loop and the engine thread running.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Turn token ids into text.

        Args:
            ids: The token ids.
            skip_special_tokens: Leave special tokens (BOS, EOS, ChatML markers) out of the text.

        Returns:
            The text; incomplete UTF-8 at the end shows as U+FFFD.
        """
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (OpenAI's ``logprobs[].bytes``).

        A single token may hold part of a UTF-8 character, so decoding it to text alone can
        only show U+FFFD; its bytes are exact. Byte-level BPE pieces map through the GPT-2
        byte alphabet, SentencePiece byte-fallback pieces (``<0xNN>``) are that byte, and
        ``▁`` is a space.

        Args:
            token_id: The token.

        Returns:
            Its bytes (special tokens give their text's UTF-8).
        """
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.special_token_ids:
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        table = _byte_decoder()
        if all(ch in table for ch in piece) and "\u2581" not in piece:
            return bytes(table[ch] for ch in piece)
        return piece.replace("\u2581", " ").encode()

    def detokenizer(self, keep: frozenset[int] = frozenset()) -> StreamingDetokenizer:
        """Start an incremental decoder for one generation stream.

        Args:
            keep: Special token ids whose text is kept (e.g. tool-call markers that a model's
                tokenizer declares special, which a parser must see); all others are dropped.

        Returns:
            A fresh `StreamingDetokenizer` bound to this tokenizer.
        """
        return StreamingDetokenizer(self, keep)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation into prompt text with the model's chat template.

        Args:
            messages: OpenAI-style messages, prepared by `chat_template.prepare_messages`
                (reasoning aliases; arguments decoded for templates that want objects).
            tools: Tool schemas; picks the `tool_use` template when the model has one.
            add_generation_prompt: End with the header of an assistant turn.
            **template_kwargs: Extra template variables (e.g. `enable_thinking=False`); they
                override `bos_token`/`eos_token`/`pad_token`.

        Returns:
            The prompt text.

        Raises:
            TemplateError: The template rejected the conversation or failed to render it.
        """
        name = "tool_use" if tools and "tool_use" in self._compiled else "default"
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        specials["pad_token"] = self.pad_token
        # Hugging Face leaves unset special tokens undefined, so `{{ bos_token }}` renders "".
        context = {key: value for key, value in specials.items() if value is not None}
        context.update(template_kwargs)
        prepared = prepare_messages(messages, self.chat_templates.get(name, CHATML_TEMPLATE))
        context.update(messages=prepared, tools=tools, add_generation_prompt=add_generation_prompt)
        try:
            return self._compiled[name].render(**context)
        except Exception as exc:
            # Whatever a template trips over comes from the conversation or the request's
            # template variables (a number where it concatenates strings, a kwarg shadowing a
            # helper it calls): it is the request's problem, never a server error.
            raise TemplateError(f"chat template failed: {exc}") from exc

    def tokenize_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Render a conversation with `apply_chat_template` and encode it.

        Special tokens are not added again: the template already writes BOS when the model
        wants one, as Hugging Face assumes too.

        Args:
            messages: As for `apply_chat_template`.
            **kwargs: `tools`, `add_generation_prompt` and template variables, as there.

        Returns:
            The prompt's token ids.
        """
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:  # bytes without a printable glyph are shifted past 255, in order
            table[chr(256 + extra)] = b
            extra += 1
    return table
