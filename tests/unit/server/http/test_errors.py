"""The error handlers of ``server.http.errors``: every failure leaves as OpenAI's envelope."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from moeserve.server.http.errors import install_handlers


def test_an_unexpected_exception_is_a_500_that_names_no_internals() -> None:
    app = FastAPI()
    install_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise KeyError("_SecretInternalName")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "_SecretInternalName" not in r.text
    assert "KeyError" not in r.text
