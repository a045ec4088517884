"""The ``moeserve`` command line as a user first meets it: help texts, log noise, warnings."""

from __future__ import annotations

import logging
import os

import pytest

from server import cli
from server.settings import unknown_env_vars


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
