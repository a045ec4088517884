"""The ``moeserve`` command line as a user first meets it: help texts, log noise, warnings."""

from __future__ import annotations

import logging
import os

import pytest

from moeserve.models.backend import is_cpu
from moeserve.server import cli
from moeserve.server.settings import resolve_dtype, unknown_env_vars


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the variables a test sets: the caller's MOESERVE_* ones must not leak in."""
    for key in list(os.environ):
        if key.upper().startswith("MOESERVE_") and key != "MOESERVE_CACHE_DIR":
            monkeypatch.delenv(key)


def test_unknown_moeserve_variables_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_RUNING", "4")  # misspelled
    monkeypatch.setenv("MOESERVE_WHATEVER", "1")
    for known in ("MOESERVE_PORT", "moeserve_host", "MOESERVE_CONFIG", "MOESERVE_BLAS_GEMV"):
        monkeypatch.setenv(known, "x")
    assert unknown_env_vars(["port", "host", "max_running"]) == [
        "ignoring unknown environment variable MOESERVE_MAX_RUNING "
        "(did you mean MOESERVE_MAX_RUNNING?)",
        "ignoring unknown environment variable MOESERVE_WHATEVER",
    ]


def test_generate_warns_about_unknown_variables_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    monkeypatch.setenv("MOESERVE_PROMT_CACHE", "false")
    with caplog.at_level(logging.WARNING, logger="moeserve"):
        assert cli.main(["generate", "--prompt", "hi", "--max-tokens", "2"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "ignoring unknown environment variable MOESERVE_PROMT_CACHE "
        "(did you mean MOESERVE_PROMPT_CACHE?)"
    ]


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_are_plain_and_show_their_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    top = _help(capsys)
    assert "``" not in top and "Mixture-of-Experts" in top
    for command in ("serve", "generate", "convert", "bench"):
        assert command in top
    bench = _help(capsys, "bench")
    assert "--url URL OpenAI base URL (default: http://127.0.0.1:8000/v1)" in bench
    assert "--verbose" in bench
    serve, generate = _help(capsys, "serve"), _help(capsys, "generate")
    dtype = "--dtype {auto,float32,float16,bfloat16} weight dtype; auto: float32 on a CPU"
    assert dtype in serve and dtype in generate
    assert "default: auto" in generate and "as stored" not in generate


def test_generate_dtype_defaults_to_auto_as_serve_does() -> None:
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi"])
    assert args.dtype == "auto"
    # serve's "auto": float32 on a CPU backend, where it is the fast path; Metal keeps the file's.
    assert resolve_dtype(args.dtype) == ("float32" if is_cpu() else None)
    assert resolve_dtype("bfloat16") == "bfloat16"
