"""Schemathesis fuzzes every operation of ``/openapi.json`` against a live server.

Hypothesis generates requests from the published schema, valid ones and, with the negative
mode, ones that break it (wrong types, missing fields, out-of-range values). Whatever arrives,
the server must answer with a status the schema documents, never a 5xx, and with the content
type and body shape it documents. The example count is bounded so the run stays short; the
seed is fixed so a failure replays.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import LiveServer

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory) -> Iterator[LiveServer]:
    # Small limits keep every generated request cheap: a few tokens out, a short context.
    live = LiveServer.start(
        tiny_model,
        "--max-model-len",
        "128",
        "--default-max-tokens",
        "4",
        "--served-model-name",
        "moeserve-fuzz",
        "--prompt-cache-dir",
        str(tmp_path_factory.mktemp("fuzz-sessions")),
        log_dir=tmp_path_factory.mktemp("fuzz-server"),
    )
    yield live
    assert live.process.poll() is None, "the server died under fuzzing:\n" + live.output()[-3000:]
    live.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every (method, path) the application publishes, positive and, with a body, negative.

    Building the app loads no model. An operation without a body or parameters has no
    schema-breaking request to generate, so it is fuzzed in the positive mode only.
    """
    from moeserve.server.http.app import create_app
    from moeserve.server.settings import Settings

    spec = create_app(Settings()).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out.append((method.upper(), path, GenerationMode.POSITIVE))
            if "requestBody" in op:
                out.append((method.upper(), path, GenerationMode.NEGATIVE))
    return out


# One test per operation, driven by Hypothesis directly: schemathesis's own pytest plugin
# (``from_fixture``) does not run under pytest 9.
@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_no_operation_answers_5xx_or_an_undocumented_status(api_schema, method, path, mode) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            # Name the served model, or nearly every generated request stops at the 404 for
            # an unknown model and the generation paths go untested.
            case.body["model"] = "moeserve-fuzz"
        case.call_and_validate(checks=CHECKS, timeout=60)

    run()
