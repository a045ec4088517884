"""Load the model that ``moeserve serve`` serves, build the runtime around it, describe it.

Knows how settings turn into a served model: which checkpoint (the demo model when none is
given), which dtype, the id and aliases clients address it by, and its context length.
Shows a progress bar while weights are read. ``build_runtime`` is the app's default runtime
factory: it loads the model, fingerprints it for the prompt cache's files, picks the chat
template and tool-call format, sizes the KV budget (``server/kv_memory.py``), starts the
engine thread and logs the summary line. The line itself, and the size and URL helpers it is
written with (``format_bytes``, ``format_count``, ``server_url``, ``weight_bytes``), are
``server/startup_summary.py``'s, importable from here too. Knows nothing of routes,
middleware or the wire format: ``server/http/app.py`` calls ``build_runtime`` in its lifespan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from moeserve.devtools.demo import DEMO_MODEL_ID, demo_model_dir
from moeserve.models.backend import set_fast_math
from moeserve.models.backend.blas import blas_warning
from moeserve.models.errors import ModelError
from moeserve.models.loader import LoadedModel, Progress, load, read_json, weight_files
from moeserve.models.shard import causal_lm
from moeserve.server.distributed import launch as distributed
from moeserve.server.distributed.engine import DistributedEngine
from moeserve.server.engine import kv_io
from moeserve.server.engine.engine import Engine
from moeserve.server.engine.prompt_cache import PromptCache, PromptCacheConfig
from moeserve.server.http.deps import Runtime
from moeserve.server.http.metrics import Metrics
from moeserve.server.kv_memory import resolve_kv_cache_max_bytes
from moeserve.server.settings import Settings, SettingsError
from moeserve.server.startup_summary import format_bytes as format_bytes  # re-exported
from moeserve.server.startup_summary import format_count as format_count  # re-exported
from moeserve.server.startup_summary import server_url as server_url  # re-exported
from moeserve.server.startup_summary import summary_line, weight_bytes
from moeserve.server.text.chat_template import CHATML_TEMPLATE
from moeserve.server.text.formats import DEFAULT_TOOL_FORMAT, detect_tool_format, tool_format
from moeserve.server.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096  # when neither the settings nor config.json give a context length
# config.json keys for the trained context length, by family (DBRX spells it max_seq_len).
_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len")


@dataclass
class ServedModel:
    """The loaded model with the names and limits the API serves it under."""

    model_id: str  # the id /v1/models reports
    aliases: list[str]  # other names a request's model field may use
    loaded: LoadedModel
    tokenizer: Tokenizer
    max_model_len: int  # prompt + completion limit of one sequence
    created: int = field(default_factory=lambda: int(time.time()))  # unix time, for /v1/models

    @property
    def names(self) -> list[str]:
        """Every name a request may use: the id first, then the aliases."""
        return [self.model_id, *self.aliases]


def default_model_id(model: str | None) -> str:
    """The served name when ``served_model_name`` is unset.

    Args:
        model: The ``model`` setting (a path or repo id), or None for the demo.

    Returns:
        ``moeserve-demo``, or the last component of the path or repo id.
    """
    if model is None:
        return DEMO_MODEL_ID
    return Path(model.rstrip("/")).name or model


def resolve_max_model_len(setting: int | None, config: dict[str, Any]) -> int:
    """The context length to serve: the setting, else the model's, else 4096.

    Args:
        setting: ``Settings.max_model_len``.
        config: The model's ``config.json``.

    Returns:
        The limit in tokens.
    """
    # Multimodal releases (Qwen3.5-MoE, Kimi-K2.5) keep the language model's in text_config.
    text = config.get("text_config")
    places = [config, text] if isinstance(text, dict) else [config]
    trained = next(
        (
            v
            for v in (place.get(k) for place in places for k in _CONTEXT_KEYS)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0
        ),
        None,
    )
    stretched = _yarn_length(places)
    if stretched is not None and (trained is None or stretched > trained):
        trained = stretched
    if setting is None:
        return trained or DEFAULT_MAX_MODEL_LEN
    if trained is not None and setting > trained:
        # Allowed (rope scaling may stretch a model), but output quality is the user's risk.
        logger.warning(
            "max_model_len %d exceeds the model's trained context of %d tokens", setting, trained
        )
    return setting


def _yarn_length(places: list[dict[str, Any]]) -> int | None:
    """The context YaRN stretches a model to: its original length times the factor.

    A config that adds YaRN to a model trained shorter (Qwen3's recipe: factor 4 over 32,768)
    keeps the old ``max_position_embeddings``; the stretched length is what it serves.
    """
    for place in places:
        for key in ("rope_scaling", "rope_parameters"):
            rope = place.get(key)
            if not isinstance(rope, dict):
                continue
            kind = rope.get("rope_type", rope.get("type"))
            original, factor = rope.get("original_max_position_embeddings"), rope.get("factor")
            if kind == "yarn" and isinstance(original, int) and isinstance(factor, int | float):
                return int(original * factor)
    return None


@contextmanager
def _progress_bar() -> Iterator[Progress]:
    """A tqdm bar in bytes, shown only on a terminal (``disable=None``), as a callback."""
    with tqdm(
        desc="loading weights",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None,
        leave=False,
    ) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def apply_compute_settings(settings: Settings) -> None:
    """Set the process-wide MLX knobs the settings name, before the model is loaded.

    Args:
        settings: The server settings (``cpu_fast_math``, ``mlx_cache_limit_bytes``).
    """
    set_fast_math(settings.cpu_fast_math)
    if settings.mlx_cache_limit_bytes is not None:
        mx.set_cache_limit(settings.mlx_cache_limit_bytes)


def load_served_model(settings: Settings) -> ServedModel:
    """Load the model the settings name, with its tokenizer, names and context length.

    Args:
        settings: The server settings.

    Returns:
        The served model.

    Raises:
        ModelError: The model cannot be found or loaded, or has no usable tokenizer.
    """
    apply_compute_settings(settings)
    source = settings.model if settings.model is not None else demo_model_dir()
    shard = distributed.rank_shard(settings) if settings.distributed else None
    with _progress_bar() as progress:
        loaded = load(source, dtype=settings.resolved_dtype(), progress=progress, shard=shard)
    whole = loaded.model
    if shard is not None:  # this rank's part, with its hand-offs or collectives
        loaded.model = distributed.attach(loaded, shard)
    try:
        tokenizer = Tokenizer.from_dir(loaded.path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {loaded.path}: {e}") from e
    _check_vocabulary(whole, tokenizer)
    model_id = settings.served_model_name or default_model_id(settings.model)
    aliases = [a for a in settings.model_aliases if a != model_id]
    return ServedModel(
        model_id=model_id,
        aliases=aliases,
        loaded=loaded,
        tokenizer=tokenizer,
        max_model_len=resolve_max_model_len(settings.max_model_len, loaded.config),
    )


def _check_vocabulary(model: Any, tokenizer: Tokenizer) -> None:
    """Warn when the tokenizer knows ids that the model's embedding table has no row for.

    Such a model can never generate those tokens, and a constrained request whose grammar
    needs one of them fails mid-answer; the usual cause is a config whose ``vocab_size``
    (or ``text_config.vocab_size``) is not the one the weights were trained with.
    """
    try:
        rows = causal_lm(model)[1].stack.embedding.weight.shape[0]
    except (TypeError, AttributeError, KeyError):  # a model without the usual layout
        return
    # The model's own ids are 0..n-1; added tokens carry theirs (no 150k-entry dict built).
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()
    highest = max(backend.get_vocab_size(with_added_tokens=False) - 1, max(added, default=-1))
    if highest >= rows:
        logger.warning(
            "the tokenizer has token ids up to %d but the model's embedding has %d rows: ids "
            "%d-%d can never be generated, and a response format or tool grammar that needs "
            "them fails; check the checkpoint's vocab_size",
            highest,
            rows,
            rows,
            highest,
        )


def model_fingerprint(served: ServedModel, dtype: str | None) -> str:
    """Identify a model's KV format: config, dtype, and a digest of each weight file's head.

    Persisted prompt caches carry it, so a restart with another model (or another fine-tune
    of the same shape) never reuses them.

    Args:
        served: The loaded model.
        dtype: The dtype the weights were loaded in.

    Returns:
        A hex digest.
    """
    return weights_fingerprint(served.loaded, dtype)


def weights_fingerprint(loaded: LoadedModel, dtype: str | None) -> str:
    """``model_fingerprint`` of a loaded model (a distributed rank other than 0 has no more).

    Args:
        loaded: The loaded model (every rank of a distributed server: the same checkpoint).
        dtype: The dtype the weights were loaded in.

    Returns:
        A hex digest.
    """
    digest = hashlib.sha256(json.dumps(loaded.config, sort_keys=True).encode())
    digest.update(str(dtype).encode())
    for file in weight_files(loaded.path):
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))  # header + first tensors: cheap, and weight-specific
    return digest.hexdigest()[:32]


def _prompt_cache(settings: Settings, served: ServedModel) -> PromptCache:
    directory = settings.prompt_cache_dir
    fingerprint = model_fingerprint(served, settings.resolved_dtype())
    if settings.distributed:  # rank 0's part of each session, in its own directory
        directory, fingerprint = distributed.prompt_cache_files(settings, fingerprint)
    config = PromptCacheConfig(
        max_bytes=settings.prompt_cache_max_bytes,
        ttl_seconds=settings.prompt_cache_ttl_seconds,
        directory=directory,
        fingerprint=fingerprint,
    )
    return PromptCache(config, encode=kv_io.tensors, load=kv_io.load)


def _default_template(served: ServedModel) -> str:
    return served.tokenizer.chat_templates.get("default") or CHATML_TEMPLATE


def _tool_format(settings: Settings, served: ServedModel) -> str:
    """The tool-call format: the setting, else detected from the template, else qwen's."""
    if settings.tool_parser != "auto":
        return settings.tool_parser
    config = read_json(served.loaded.path / "tokenizer_config.json", required=False)
    vocabulary = served.tokenizer.backend.get_vocab()
    return detect_tool_format(_default_template(served), config, vocabulary) or DEFAULT_TOOL_FORMAT


def build_runtime(settings: Settings) -> Runtime:
    """Load the configured model, start the engine, log the summary line.

    Args:
        settings: The server settings.

    Returns:
        The runtime the routes serve from.

    Raises:
        ModelError: The model cannot be found or loaded, or has no usable tokenizer.
    """
    served = load_served_model(settings)
    fmt = _tool_format(settings, served)
    # Harmony's <|call|> ends a turn, yet gpt-oss's first generation configs do not list it.
    served.tokenizer.add_eos_tokens(tool_format(fmt).TURN_END)
    config = settings.scheduler_config(served.max_model_len)
    try:
        layout = served.loaded.model.cache_layout().quantized(settings.kv_cache_bits)
    except ValueError as e:  # heads the quantization groups cannot divide
        raise SettingsError(str(e), ("kv_cache_bits",)) from e
    kv_bytes = resolve_kv_cache_max_bytes(
        settings.kv_cache_max_bytes,
        layout,
        weights=weight_bytes(served),
        prompt_cache=settings.prompt_cache_max_bytes if settings.prompt_cache else 0,
        max_model_len=config.max_model_len,
        prefill_chunk=config.prefill_chunk,
    )
    engine_class: Any = Engine
    if settings.distributed:  # rank 0 broadcasts every step to the other ranks
        engine_class = functools.partial(
            DistributedEngine,
            link=distributed.link(),
            heartbeat=settings.distributed_timeout_seconds / 4,
        )
    engine = engine_class(
        served.loaded.model,
        served.tokenizer,
        config,
        prompt_cache=_prompt_cache(settings, served) if settings.prompt_cache else None,
        kv_cache_max_bytes=kv_bytes,
        kv_cache_bits=settings.kv_cache_bits,
    )
    engine.start()
    engine.grammar.ll_tokenizer  # noqa: B018  build llguidance's tokenizer now, not on a request
    runtime = Runtime(
        model_id=served.model_id,
        aliases=list(served.aliases),
        tokenizer=served.tokenizer,
        engine=engine,
        max_model_len=served.max_model_len,
        created=served.created or int(time.time()),
        settings=settings,
        metrics=Metrics(engine.stats, kv_cache_max_bytes=kv_bytes),
        tool_format=fmt,
        chat_template=_default_template(served),
        kv_budget=engine.scheduler.budget,
    )
    # Under the server's logger name, like the CLI's own lines: users see it as moeserve's.
    logging.getLogger("moeserve").info("%s", summary_line(served, settings, kv_bytes))
    if settings.distributed:
        logging.getLogger("moeserve").info("%s", distributed.summary(settings.distributed))
    # A slow BLAS costs ~25x on matrix products; the summary line names it, but few read it.
    if (warning := blas_warning()) is not None:
        logging.getLogger("moeserve").warning("%s", warning)
    return runtime
