"""Server settings: ``config/server.toml`` < ``MOESERVE_*`` environment < command-line flags.

Knows every setting of ``moeserve serve``, its default, its documentation and which checks
apply to it, and how the settings become a ``SchedulerConfig``. The checks themselves (list
splitting, the single-value rules and their messages, the API key file) and ``resolve_dtype``
are ``server/settings_values.py``'s; ``resolve_dtype`` is re-exported here. Where each value
came from (so that an error names the setting *and* its source), the flags' and variables'
spellings and the TOML file are ``server/settings_sources.py``'s, re-exported here too.
Cross-setting checks (``prefill_chunk`` against ``max_batched_tokens``) stay on ``Settings``.
Knows nothing about HTTP, models or the engine's internals: the model-dependent defaults
(``max_model_len``, the served name, and ``kv_cache_max_bytes`` through
``server/kv_memory.py``) are resolved in ``server/startup.py`` once the model is loaded.

``Settings()`` alone reads keyword arguments and the environment; ``load_settings`` adds the
TOML file underneath them, which is what the command line uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from moeserve.server import settings_values as rules
from moeserve.server.engine.scheduler import SchedulerConfig
from moeserve.server.settings_sources import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ENV_PREFIX,
    FileSource,
    SettingsError,
    cli_flag,
    conflict,
    env_var,
    file_values,
    read_config_file,
    resolve_config_path,
    settings_error,
    unknown_env_vars,
)
from moeserve.server.settings_values import resolve_dtype
from moeserve.server.text.formats import TOOL_FORMAT_NAMES

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "cli_flag",
    "env_var",
    "load_settings",
    "resolve_config_path",
    "resolve_dtype",
    "unknown_env_vars",
]

# A list read from the environment arrives as one string; the before-validator splits it.
StrList = Annotated[list[str], NoDecode]
# "auto" or a registered tool-call format (server/text/formats); the flag's choices too.
ToolParserChoice = Literal[("auto", *TOOL_FORMAT_NAMES)]  # type: ignore[valid-type]


class Settings(BaseSettings):
    """Every setting of ``moeserve serve``; ``config/server.toml`` lists them with defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # `MOESERVE_MODEL=` means "not set", not "the empty name"
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    model: str | None = Field(
        None,
        description="model directory or Hugging Face repo id; unset: the built-in demo model",
    )
    served_model_name: str | None = Field(
        None,
        description="model id reported by /v1/models; unset: moeserve-demo for the demo, "
        "else the last component of the model path or repo id",
    )
    model_aliases: StrList = Field(
        [], description="other names a request's model field may use for the served model"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="weight dtype; auto: float32 on a CPU backend, the checkpoint's on Metal",
    )
    max_running: int = Field(32, ge=1, description="sequences decoding or prefilling at once")
    max_waiting: int = Field(
        256, ge=1, description="queued sequences beyond which requests get HTTP 429"
    )
    max_batched_tokens: int = Field(
        2048, ge=1, description="tokens computed per engine step (prefill chunks + decode rows)"
    )
    prefill_chunk: int = Field(
        512, ge=1, description="longest prompt slice prefilled for one sequence in one step"
    )
    prefill_step_ratio: float = Field(
        0.0,
        description="while streams decode, a step carrying prefill may take this multiple of "
        "the decodes alone (predicted from measured steps); 0: token budget only",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="prompt + completion token limit; unset: the model's "
        "max_position_embeddings, else 4096",
    )
    default_max_tokens: int = Field(
        4096, ge=1, description="cap on the completion length of a request that sets none"
    )
    max_n: int = Field(8, ge=1, description="largest n (choices per request) accepted")
    api_keys: StrList = Field(
        [], description="accepted bearer tokens; none (and no api_key_file): no auth"
    )
    api_key_file: Path | None = Field(
        None, description="file of API keys, one per line, # comments; merged with api_keys"
    )
    admin_api_keys: StrList = Field(
        [],
        description="keys that may also list and delete every tenant's cached sessions "
        "(/v1/sessions); accepted like api_keys",
    )
    cors_origins: StrList = Field(
        [], description="origins allowed by CORS (* for any); none: CORS off"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="logging level of the server and uvicorn"
    )
    sse_keepalive_seconds: float = Field(
        5.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds between SSE comment lines while a stream waits (e.g. a long prefill)",
    )
    max_request_bytes: int = Field(
        8 * 1024**2,
        ge=1,
        description="largest request body in bytes; a larger one gets HTTP 413 before it is read",
    )
    shutdown_drain_seconds: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="on SIGTERM or SIGINT, seconds running requests get to finish while new "
        "ones get HTTP 503; streams still running then end with an error event",
    )

    tool_parser: ToolParserChoice = Field(
        "auto",
        description="tool-call markup to parse and constrain; auto: detected from the chat "
        "template (qwen when the template shows none)",
    )
    prompt_cache: bool = Field(
        True, description="keep each session's KV cache so the next turn prefills only what is new"
    )
    prompt_cache_max_bytes: int = Field(
        2 * 1024**3, ge=0, description="prompt-cache memory budget in bytes (LRU eviction above)"
    )
    prompt_cache_ttl_seconds: float = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="drop a cached session unused for this many seconds from memory (its "
        "file in prompt_cache_dir stays)",
    )
    prompt_cache_dir: Path | None = Field(
        None,
        description="directory where each session's cache is written when its turn finishes "
        "(in the background) and found again after a restart; unset: memory only",
    )
    responses_store_max: int = Field(
        1024,
        ge=0,
        description="finished Responses API responses kept in memory for previous_response_id "
        "and GET /v1/responses/{id} (the oldest leave first); 0: none is stored",
    )
    responses_store_ttl_seconds: float = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds a stored Responses API response is kept after it finished",
    )
    kv_cache_max_bytes: int | None = Field(
        None,
        ge=0,
        description="bytes that running sequences' KV caches may hold together (the newest "
        "is preempted and recomputed later when decoding would exceed it; a request that "
        "cannot fit alone gets HTTP 400); 0: no byte bound; unset: half the memory left "
        "after the weights and prompt_cache_max_bytes (Metal: of the recommended working "
        "set), at least one max_model_len sequence when memory allows",
    )
    kv_cache_bits: int | None = Field(
        None,
        description="store cached keys and values quantized to 8 or 4 bits (MLX affine "
        "groups of 64 or 32 along each head; heads must be a multiple of 32 wide): about "
        "3.5x or 6x more tokens per byte in float32, at a small cost in exactness and "
        "speed (bench/RESULTS.md); unset: stored as computed",
    )
    cpu_fast_math: bool = Field(
        True,
        description="on MLX's CPU backend, compute exp, softmax and SiLU with moeserve's "
        "compiled kernels (about 3x faster than MLX's); false: MLX's own ops",
    )
    mlx_cache_limit_bytes: int | None = Field(
        None,
        ge=0,
        description="bytes of freed MLX buffers kept for reuse (more: fewer page faults on "
        "large activations, higher RSS); unset: MLX's default (32 MiB on the CPU)",
    )
    distributed: Literal["pipeline", "tensor"] | None = Field(
        None,
        description="serve one model from several processes started by mlx.launch "
        "(README: Distributed serving): pipeline (each rank a slice of the layers) or tensor "
        "(each rank part of every layer's heads and experts); rank 0 serves HTTP, the others "
        "open no port; unset: one process",
    )
    distributed_timeout_seconds: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="with distributed: a step's communication that takes longer (a rank "
        "died, the network is down) stops every rank with a message naming it",
    )

    _file_keys: frozenset[str] = PrivateAttr(default=frozenset())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments (the CLI) > environment > TOML; no ``.env`` or secrets dirs."""
        return init_settings, env_settings, FileSource(settings_cls)

    # The rules themselves, with their messages, are settings_values.py's.

    @field_validator("model_aliases", "api_keys", "admin_api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return rules.split_list(value)

    @field_validator("kv_cache_bits")
    @classmethod
    def _check_bits(cls, value: int | None) -> int | None:
        return rules.check_bits(value)

    @field_validator("prefill_step_ratio")
    @classmethod
    def _check_step_ratio(cls, value: float) -> float:
        return rules.check_step_ratio(value)

    @field_validator("model_aliases", "api_keys", "admin_api_keys", "cors_origins")
    @classmethod
    def _check_items(cls, values: list[str]) -> list[str]:
        return rules.check_items(values)

    @field_validator("host", "served_model_name")
    @classmethod
    def _check_word(cls, value: str | None) -> str | None:
        return rules.check_word(value)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str | None) -> str | None:
        return rules.check_model(value)

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, values: list[str]) -> list[str]:
        return rules.check_origins(values)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return rules.lower_level(value)

    @field_validator("sse_keepalive_seconds")
    @classmethod
    def _finite(cls, value: float) -> float:
        return rules.finite(value)

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if self.prefill_chunk > self.max_batched_tokens:
            raise conflict(
                ("prefill_chunk", "max_batched_tokens"),
                f"prefill_chunk ({self.prefill_chunk}) must not exceed max_batched_tokens "
                f"({self.max_batched_tokens}): a chunk is computed within one step's budget",
            )
        if self.api_key_file is not None:
            self._file_keys = rules.read_key_file(self.api_key_file)
        return self

    def all_api_keys(self) -> frozenset[str]:
        """The accepted API keys: ``api_keys``, those of ``api_key_file``, ``admin_api_keys``.

        Returns:
            The keys; empty means authentication is off.
        """
        return frozenset(self.api_keys) | self._file_keys | frozenset(self.admin_api_keys)

    def resolved_dtype(self) -> str | None:
        """The dtype to load weights in, ``auto`` resolved for the current MLX device.

        Returns:
            A dtype name, or None to keep the checkpoint's dtype.
        """
        return resolve_dtype(self.dtype)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        """The scheduler's limits.

        Args:
            model_max_len: The model's context length; ``max_model_len`` wins when set.

        Returns:
            The config.
        """
        return SchedulerConfig(
            max_running=self.max_running,
            max_batched_tokens=self.max_batched_tokens,
            max_waiting=self.max_waiting,
            prefill_chunk=self.prefill_chunk,
            max_model_len=self.max_model_len or model_max_len,
            prefill_step_ratio=self.prefill_step_ratio,
        )


def load_settings(config_path: Path | None = None, **cli_overrides: Any) -> Settings:
    """Build the settings from the TOML file, the environment and the command line.

    Args:
        config_path: The TOML file (default: ``$MOESERVE_CONFIG``, else the repository's
            ``config/server.toml`` when it exists).
        **cli_overrides: Setting values from the command line; None means "not given".

    Returns:
        The validated settings.

    Raises:
        SettingsError: A bad value (the message names the setting and its source), or a
            bad config file.
    """
    unknown = sorted(cli_overrides.keys() - Settings.model_fields.keys())
    if unknown:
        raise TypeError(f"load_settings() got unknown setting(s): {', '.join(unknown)}")
    path = resolve_config_path(config_path)
    values = read_config_file(path, Settings.model_fields) if path is not None else {}
    overrides = {k: v for k, v in cli_overrides.items() if v is not None}
    with file_values(values):
        try:
            return Settings(**overrides)
        except ValidationError as e:
            raise settings_error(e, overrides, path, values) from None
