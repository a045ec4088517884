"""`moeserve serve` startup: flags, the default command, loading the served model, its summary."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import moeserve.models.loader as loader
from moeserve.models.backend import fast_math_in_use
from moeserve.models.backend.blas import blas_in_use
from moeserve.models.errors import ModelError
from moeserve.server import cli
from moeserve.server.settings import Settings, cli_flag, env_var
from moeserve.server.startup import (
    apply_compute_settings,
    default_model_id,
    format_bytes,
    format_count,
    load_served_model,
    resolve_max_model_len,
    server_url,
    summary_line,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private MOESERVE_CACHE_DIR holding the demo model, built once for this module."""
    root = tmp_path_factory.mktemp("moeserve_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESERVE_CACHE_DIR", str(root))
        yield root


@pytest.fixture(autouse=True)
def _clean_env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's MOESERVE_* settings must not leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("MOESERVE_") and key != "MOESERVE_CACHE_DIR":
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def demo_dir(cache_dir: Path) -> Path:
    from moeserve.devtools.demo import demo_model_dir

    return demo_model_dir()


# --- load_served_model ----------------------------------------------------------------------


def test_demo_model_is_the_default(demo_dir: Path) -> None:
    before = int(time.time())
    served = load_served_model(Settings())
    config = json.loads((demo_dir / "config.json").read_text())
    assert served.model_id == "moeserve-demo" and served.aliases == []
    assert served.loaded.path == demo_dir and served.loaded.model_type == "qwen2_moe"
    assert served.max_model_len == config["max_position_embeddings"]
    assert served.tokenizer.vocab_size == config["vocab_size"]
    assert before <= served.created <= int(time.time())
    # dtype auto on this CPU backend: float32.
    assert {str(v.dtype) for _, v in tree_flatten(served.loaded.model.parameters())} == {
        "mlx.core.float32"
    }


def test_names_and_limits_from_settings(demo_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        served_model_name="m", model_aliases=["m", "a", "b", "a"], max_model_len=10_000
    )
    with caplog.at_level(logging.WARNING):
        served = load_served_model(settings)
    assert served.model_id == "m" and served.aliases == ["a", "b"]
    assert served.names == ["m", "a", "b"]
    assert served.max_model_len == 10_000
    assert "exceeds the model's trained context of 4096" in caplog.text


def test_model_path_names_the_model(demo_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "my-moe"
    link.symlink_to(demo_dir, target_is_directory=True)
    served = load_served_model(Settings(model=f"{link}/", dtype="float16"))
    assert served.model_id == "my-moe"
    dtypes = {str(v.dtype) for _, v in tree_flatten(served.loaded.model.parameters())}
    assert dtypes == {"mlx.core.float16"}


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(str(tmp_path / "absent"))):
        load_served_model(Settings(model=str(tmp_path / "absent")))


def test_missing_tokenizer(demo_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(demo_dir, tmp_path / "no-tokenizer")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer") as info:
        load_served_model(Settings(model=str(copy)))
    assert str(copy) in str(info.value)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (None, "moeserve-demo"),
        ("mlx-community/Qwen1.5-MoE-A2.7B-4bit", "Qwen1.5-MoE-A2.7B-4bit"),
        ("/models/glm-air/", "glm-air"),
        ("relative/dir", "dir"),
    ],
)
def test_default_model_id(model: str | None, expected: str) -> None:
    assert default_model_id(model) == expected


@pytest.mark.parametrize(
    ("setting", "config", "expected"),
    [
        (None, {"max_position_embeddings": 32768}, 32768),
        (None, {"max_seq_len": 2048}, 2048),  # DBRX's spelling
        (None, {}, 4096),
        (None, {"max_position_embeddings": True}, 4096),  # not a length
        (None, {"text_config": {"max_position_embeddings": 262144}}, 262144),  # Qwen3.5-MoE
        (  # Qwen3 with YaRN added as its card says: factor 4 over the original 32,768
            None,
            {
                "max_position_embeddings": 40960,
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32768,
                },
            },
            131072,
        ),
        (  # gpt-oss: already the stretched length
            None,
            {
                "max_position_embeddings": 131072,
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "original_max_position_embeddings": 4096,
                },
            },
            131072,
        ),
        (1000, {"max_position_embeddings": 32768}, 1000),
    ],
)
def test_resolve_max_model_len(setting: int | None, config: dict[str, Any], expected: int) -> None:
    assert resolve_max_model_len(setting, config) == expected


def test_load_reports_progress_in_bytes(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    loaded = loader.load(demo_dir, progress=lambda done, total: calls.append((done, total)))
    params = [v for _, v in tree_flatten(loaded.model.parameters())]
    total = sum(v.nbytes for v in params)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert calls == sorted(calls)  # done never goes back
    # One evaluation per tensor when the batch size is tiny: one report each, plus the start.
    monkeypatch.setattr(loader, "_EVAL_BATCH_BYTES", 1)
    calls.clear()
    loader.load(demo_dir, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == len(params) + 1 and calls[-1] == (total, total)


# --- summary_line ---------------------------------------------------------------------------


def test_summary_line(demo_dir: Path) -> None:
    settings = Settings(model_aliases=["tiny"])
    served = load_served_model(settings)
    params = [v for _, v in tree_flatten(served.loaded.model.parameters())]
    line = summary_line(served, settings)
    assert "\n" not in line
    assert line.startswith("serving moeserve-demo (aliases: tiny): qwen2_moe,")
    # A float model's parameter count is the sum of its tensor sizes.
    assert f"{format_count(sum(v.size for v in params))} parameters" in line
    assert "float32 weights" in line
    assert format_bytes(sum(v.nbytes for v in params)) in line and "MiB" in line
    kernels = "compiled CPU math" if fast_math_in_use() else "MLX CPU math"
    assert f"BLAS: {blas_in_use()}, {kernels};" in line
    assert line.endswith("at http://127.0.0.1:8000/v1")


def test_summary_line_names_the_cpu_kernels(demo_dir: Path, fastmath_state) -> None:
    settings = Settings(cpu_fast_math=False)
    served = load_served_model(settings)
    assert not fast_math_in_use()
    assert ", MLX CPU math;" in summary_line(served, settings)


def test_compute_settings_reach_mlx(fastmath_state) -> None:
    before = mx.set_cache_limit(1 << 20)  # read the current limit (and set a known one)
    try:
        apply_compute_settings(Settings(mlx_cache_limit_bytes=12_345_678, cpu_fast_math=False))
        assert mx.set_cache_limit(1 << 20) == 12_345_678
        assert not fast_math_in_use()
        apply_compute_settings(Settings())  # unset: MLX's limit stays as it is
        assert mx.set_cache_limit(1 << 20) == 1 << 20
    finally:
        mx.set_cache_limit(before)


def test_formatting_helpers() -> None:
    assert format_count(2_700_000_000) == "2.7B"
    assert format_count(1_250_000) == "1.2M"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(5 * 2**20 + 2**19) == "5.5 MiB"
    assert server_url("0.0.0.0", 80) == "http://0.0.0.0:80/v1"
    assert server_url("::1", 8000) == "http://[::1]:8000/v1"


# --- the command line -----------------------------------------------------------------------


def test_serve_help_documents_every_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would otherwise wrap at hyphens
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config PATH" in text
    for name, field in Settings.model_fields.items():
        assert cli_flag(name) in text and env_var(name) in text, name
        assert " ".join(field.description.split()) in text, name
    assert "--api-key API_KEY" in text and "repeatable" in text


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["serve", "--max-running", "0"], "max_running"),
        (["--port", "abc"], "port"),  # no subcommand: serve
        (["--log-level", "debug", "--dtype", "float64"], "dtype"),
        (["serve", "--api-key", "a b"], "api_keys"),
    ],
)
def test_bad_flag_exits_2_with_one_line(
    argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"setting {setting}" in err and cli_flag(setting) in err


@pytest.fixture
def served_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stand-ins for server.http.app.create_app and the uvicorn server, recording arguments."""
    import moeserve.server.http.drain

    calls: dict[str, Any] = {}
    app = types.ModuleType("moeserve.server.http.app")
    the_app = types.SimpleNamespace(state=types.SimpleNamespace(drain="the-drain"))

    def create_app(settings: Settings) -> Any:
        calls["settings"] = settings
        return the_app

    class Server:
        started = True

        def __init__(self, config: Any, drain: Any) -> None:
            calls["app"], calls["drain"] = config.app, drain
            calls["run"] = {k: getattr(config, k) for k in ("host", "port", "log_level")}

        def run(self) -> None:
            calls["ran"] = True

    app.create_app = create_app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "moeserve.server.http.app", app)
    monkeypatch.setattr(moeserve.server.http.drain, "DrainingServer", Server)
    calls["the_app"] = the_app
    return calls


def test_serve_runs_uvicorn_with_layered_settings(
    served_calls: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.toml"
    config.write_text("max_n = 3\nport = 9000\n")
    monkeypatch.setenv("MOESERVE_MAX_RUNNING", "7")
    argv = ["serve", "--config", str(config), "--port", "9001", "--api-key", "k1"]
    assert cli.main([*argv, "--api-key", "k2"]) == 0
    settings = served_calls["settings"]
    assert (settings.max_n, settings.max_running, settings.port) == (3, 7, 9001)
    assert settings.api_keys == ["k1", "k2"]
    assert served_calls["app"] is served_calls["the_app"]
    assert served_calls["drain"] == "the-drain" and served_calls["ran"]
    assert served_calls["run"] == {"host": "127.0.0.1", "port": 9001, "log_level": "info"}


def test_no_subcommand_serves_defaults(served_calls: dict[str, Any]) -> None:
    assert cli.main([]) == 0
    assert served_calls["settings"].model_dump() == Settings().model_dump()
    assert cli.main(["--log-level", "DEBUG"]) == 0
    assert served_calls["run"]["log_level"] == "debug"


def test_serve_warns_about_unknown_moeserve_variables(
    served_calls: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MOESERVE_MAX_RUNING", "7")  # misspelled: the default stays
    with caplog.at_level(logging.WARNING, logger="moeserve"):
        assert cli.main([]) == 0
    assert served_calls["settings"].max_running == Settings().max_running
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "ignoring unknown environment variable MOESERVE_MAX_RUNING "
        "(did you mean MOESERVE_MAX_RUNNING?)"
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["serve"]),
        (["--port", "1"], ["serve", "--port", "1"]),
        (["--log-level", "debug"], ["--log-level", "debug", "serve"]),
        (["--log-level=debug", "--port", "1"], ["--log-level=debug", "serve", "--port", "1"]),
        (["generate", "--prompt", "x"], ["generate", "--prompt", "x"]),
        (
            ["--log-level", "debug", "convert", "a", "b"],
            ["--log-level", "debug", "convert", "a", "b"],
        ),
        (["-h"], ["-h"]),
    ],
)
def test_default_command_insertion(argv: list[str], expected: list[str]) -> None:
    assert cli._with_default_command(argv) == expected


def test_other_subcommands_still_parse() -> None:
    args = cli.build_parser().parse_args(["--log-level", "debug", "generate", "--prompt", "hi"])
    assert (args.command, args.prompt, args.log_level) == ("generate", "hi", "debug")
    args = cli.build_parser().parse_args(["convert", "src", "dst", "--quantize"])
    assert (args.command, args.src, args.quantize) == ("convert", "src", True)


def test_a_tokenizer_larger_than_the_embedding_is_named(
    demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = shutil.copytree(demo_dir, tmp_path / "extra-tokens")
    spec = json.loads((copy / "tokenizer.json").read_text())
    rows = json.loads((copy / "config.json").read_text())["vocab_size"]
    spec["added_tokens"].append(
        {
            "id": rows,
            "content": "<|beyond|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        served = load_served_model(Settings(model=str(copy)))
    assert served.tokenizer.backend.token_to_id("<|beyond|>") == rows  # one past the table
    assert f"ids up to {rows} but the model's embedding has {rows} rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_served_model(Settings())  # the demo model's tokenizer fits its embedding
    assert "embedding has" not in caplog.text
