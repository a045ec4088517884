"""Settings: config/server.toml agrees with the fields, precedence, lists, key files, errors."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from pydantic import ValidationError

from moeserve.server.settings import (
    DEFAULT_CONFIG,
    Settings,
    SettingsError,
    cli_flag,
    env_var,
    load_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY_LINE = re.compile(r"^(#\s*)?([a-z_]+) = ")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's MOESERVE_* variables must not leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("MOESERVE_"):
            monkeypatch.delenv(key)


def write_toml(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


# --- config/server.toml and the fields cannot drift apart -----------------------------------


def _key_lines() -> dict[str, tuple[int, bool]]:
    """Setting name -> (line index, commented out) for every key line of the shipped TOML."""
    found = {}
    for i, line in enumerate(DEFAULT_CONFIG.read_text().splitlines()):
        match = KEY_LINE.match(line)
        if match:
            assert match.group(2) not in found, f"{match.group(2)} listed twice"
            found[match.group(2)] = (i, bool(match.group(1)))
    return found


def test_toml_lists_exactly_the_settings() -> None:
    assert set(_key_lines()) == set(Settings.model_fields)


def test_toml_values_are_the_field_defaults() -> None:
    data = tomllib.loads(DEFAULT_CONFIG.read_text())
    for name, (_, commented) in _key_lines().items():
        default = Settings.model_fields[name].default
        if default is None:
            # TOML has no null: an unset default is documented as a commented-out example.
            assert commented and name not in data, name
        else:
            assert not commented, f"{name} must be written with its default value"
            assert data[name] == default and type(data[name]) is type(default), name


def test_every_toml_key_has_a_comment_above() -> None:
    lines = DEFAULT_CONFIG.read_text().splitlines()
    for name, (i, _) in _key_lines().items():
        above = lines[i - 1]
        assert above.startswith("# ") and not KEY_LINE.match(above), name


def test_shipped_toml_loads_to_the_defaults() -> None:
    assert load_settings(DEFAULT_CONFIG).model_dump() == Settings().model_dump()


def test_every_field_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, name


# --- precedence: TOML < environment < command line ------------------------------------------


def test_toml_then_env_then_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toml(tmp_path, "port = 9000\nmax_n = 3\n")
    assert load_settings(path).port == 9000
    monkeypatch.setenv("MOESERVE_PORT", "9100")
    settings = load_settings(path)
    assert (settings.port, settings.max_n) == (9100, 3)
    assert load_settings(path, port=9200).port == 9200
    assert load_settings(path, port=None).port == 9100  # None: the flag was not given


def test_empty_env_value_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_PORT", "")
    assert load_settings(write_toml(tmp_path, "port = 9000\n")).port == 9000


def test_config_file_from_env_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env_file = write_toml(tmp_path / "a", "port = 9001\n")
    flag_file = write_toml(tmp_path / "b", "port = 9002\n")
    monkeypatch.setenv("MOESERVE_CONFIG", str(env_file))
    assert load_settings().port == 9001
    assert load_settings(flag_file).port == 9002


def test_missing_named_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=re.escape(str(tmp_path / "nope.toml"))):
        load_settings(tmp_path / "nope.toml")


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(SettingsError, match=f"{re.escape(str(path))} is not valid TOML"):
        load_settings(path)


def test_unknown_toml_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "prot = 9000\n")
    with pytest.raises(SettingsError, match=r"unknown setting.*prot") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_unknown_override_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="prot"):
        load_settings(write_toml(tmp_path), prot=1)


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Settings().port = 1  # type: ignore[misc]


# --- lists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('["a", "b"]', ["a", "b"]),
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ("a,a,b", ["a", "b"]),  # repeats dropped, order kept
        ("solo", ["solo"]),
    ],
)
def test_list_from_env(
    raw: str, expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("api_keys", "model_aliases"):
        monkeypatch.setenv(env_var(name), raw)
    settings = load_settings(write_toml(tmp_path))
    assert settings.api_keys == expected
    assert settings.model_aliases == expected


def test_list_from_toml_and_cli(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'cors_origins = ["https://a.example", "*"]\n')
    assert load_settings(path).cors_origins == ["https://a.example", "*"]
    assert load_settings(path, cors_origins=["http://b"]).cors_origins == ["http://b"]


def test_bad_json_list_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_API_KEYS", '["a", ')
    with pytest.raises(SettingsError, match=r"api_keys.*MOESERVE_API_KEYS.*JSON"):
        load_settings(write_toml(tmp_path))


# --- API key file ---------------------------------------------------------------------------


def test_api_key_file_merges_with_api_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\n\nk1\n  k2  \n# k3 is revoked\n")
    settings = load_settings(write_toml(tmp_path), api_keys=["k0", "k1"], api_key_file=str(keys))
    assert settings.all_api_keys() == frozenset({"k0", "k1", "k2"})
    assert Settings().all_api_keys() == frozenset()


def test_api_key_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("secret\n")
    monkeypatch.setenv("MOESERVE_API_KEY_FILE", str(keys))
    assert load_settings(write_toml(tmp_path)).all_api_keys() == frozenset({"secret"})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),  # missing
        ("dir", "cannot read"),  # a directory
        ("# only a comment\n\n", "holds no keys"),  # would silently switch auth off
        ("good\nbad key\n", "line 2"),
    ],
)
def test_api_key_file_errors(tmp_path: Path, content: str | None, reason: str) -> None:
    keys = tmp_path / "keys"
    if content == "dir":
        keys.mkdir()
    elif content is not None:
        keys.write_text(content)
    with pytest.raises(SettingsError, match=reason) as info:
        load_settings(write_toml(tmp_path), api_key_file=str(keys))
    assert "api_key_file" in str(info.value) and str(keys) in str(info.value)
    assert info.value.settings == ("api_key_file",)


def test_admin_api_keys_are_accepted_keys(tmp_path: Path) -> None:
    settings = load_settings(write_toml(tmp_path), api_keys="k1", admin_api_keys="root1,root2")
    assert settings.admin_api_keys == ["root1", "root2"]
    assert settings.all_api_keys() == frozenset({"k1", "root1", "root2"})


# --- every bad value names its setting ------------------------------------------------------

BAD_VALUES: dict[str, list[Any]] = {
    "host": ["", "two words"],
    "port": [0, 65536, "http"],
    "model": ["", " padded"],
    "served_model_name": ["", "has space"],
    "model_aliases": [["ok", "has space"], [""]],
    "dtype": ["float64", "auto "],
    "max_running": [0, "many"],
    "max_waiting": [0],
    "max_batched_tokens": [0],
    "prefill_chunk": [0, -5, 1.5],
    "prefill_step_ratio": [0.5, -1, "fast"],
    "max_model_len": [0],
    "default_max_tokens": [0],
    "max_n": [0],
    "api_keys": [["a b"]],
    "admin_api_keys": [["a b"]],
    "api_key_file": ["/nonexistent/moeserve/keys"],
    "cors_origins": [["example.com"]],
    "log_level": ["loud"],
    "sse_keepalive_seconds": [0, -1, "nan", "inf"],
    "max_request_bytes": [0, "big"],
    "shutdown_drain_seconds": [-1, "nan", "inf"],
    "tool_parser": ["hermes"],
    "prompt_cache": ["maybe"],
    "prompt_cache_max_bytes": [-1, "lots"],
    "prompt_cache_ttl_seconds": [0, "nan"],
    "prompt_cache_dir": [["not", "a", "path"]],
    "responses_store_max": [-1, "many"],
    "responses_store_ttl_seconds": [0, "nan", "inf"],
    "kv_cache_max_bytes": [-1, 1.5, "lots"],
    "kv_cache_bits": [2, 16, "eight"],
    "cpu_fast_math": ["sometimes"],
    "mlx_cache_limit_bytes": [-1, "big"],
    "distributed": ["both", 2],
    "distributed_timeout_seconds": [0, "nan", "soon"],
}


def test_bad_values_cover_every_setting() -> None:
    assert set(BAD_VALUES) == set(Settings.model_fields)


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, values in BAD_VALUES.items() for v in values]
)
def test_bad_value_names_setting_and_flag(name: str, value: Any, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(write_toml(tmp_path), **{name: value})
    message = str(info.value)
    assert info.value.settings == (name,)
    assert f"setting {name}" in message and f"command line {cli_flag(name)}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "raw"),
    [("port", "abc"), ("dtype", "float64"), ("cors_origins", "example.com"), ("max_n", "0")],
)
def test_bad_env_value_names_the_variable(
    name: str, raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_var(name), raw)
    with pytest.raises(
        SettingsError, match=f"setting {name}.*environment variable {env_var(name)}"
    ):
        load_settings(write_toml(tmp_path))


def test_bad_toml_value_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = "eighty"\n')
    with pytest.raises(SettingsError, match="setting port") as info:
        load_settings(path)
    assert f"config file {path}" in str(info.value)


def test_prefill_chunk_within_budget(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_batched_tokens = 256\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path, prefill_chunk=1024)
    message = str(info.value)
    assert set(info.value.settings) == {"prefill_chunk", "max_batched_tokens"}
    assert "prefill_chunk from command line --prefill-chunk" in message
    assert f"max_batched_tokens from config file {path}" in message
    assert load_settings(path, prefill_chunk=256).prefill_chunk == 256


def test_log_level_is_case_blind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOESERVE_LOG_LEVEL", "DEBUG")
    assert load_settings(write_toml(tmp_path)).log_level == "debug"


# --- derived values -------------------------------------------------------------------------


def test_resolved_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(dtype="bfloat16").resolved_dtype() == "bfloat16"
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert Settings().resolved_dtype() == "float32"
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert Settings().resolved_dtype() is None  # Metal: keep the checkpoint's dtype


def test_scheduler_config() -> None:
    settings = Settings(max_running=3, max_waiting=5, max_batched_tokens=64, prefill_chunk=16)
    config = settings.scheduler_config(model_max_len=100)
    assert (config.max_running, config.max_waiting) == (3, 5)
    assert (config.max_batched_tokens, config.prefill_chunk) == (64, 16)
    assert config.max_model_len == 100
    assert config.prefill_step_ratio == 0.0
    assert Settings(prefill_step_ratio=2).scheduler_config(100).prefill_step_ratio == 2
    assert Settings(max_model_len=50).scheduler_config(100).max_model_len == 50
