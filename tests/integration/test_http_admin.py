"""Models, health, metrics, tokenizer and documentation routes of a live server.

Metrics are checked by what moves: each counter's change across a request equals what that
request's own response reports (usage, status), read with prometheus-client's text parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model_id}",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/sessions",
)


def _served_id(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


def test_list_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[1:] == ["tiny"]  # the served id, then the alias
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["context_length"] == 512
        assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)


def test_get_model_by_id_and_alias(client):
    served = _served_id(client)
    for name in (served, "tiny"):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == name
        assert r.json()["context_length"] == 512


def test_unknown_model_is_404(client):
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found"
    assert "gpt-4o" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["running"] == 0 and body["waiting"] == 0


def _scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _requests(route: str, status: int) -> tuple[str, tuple]:
    return ("moeserve_requests_total", (("route", route), ("status", str(status))))


def test_metrics_move(client):
    before = _scrape(client)
    for name in (
        "moeserve_running_sequences",
        "moeserve_waiting_sequences",
        "moeserve_prompt_tokens_total",
        "moeserve_generation_tokens_total",
        "moeserve_prompt_cache_hit_tokens_total",
        "moeserve_time_to_first_token_seconds_count",
        "moeserve_inter_token_latency_seconds_count",
    ):
        assert (name, ()) in before, name
    assert before["moeserve_running_sequences", ()] == 0
    assert ("moeserve_time_to_first_token_seconds_bucket", (("le", "0.1"),)) in before

    chat = "/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "metrics"}]}
    ok = client.post(chat, json={**body, "max_tokens": 10, "ignore_eos": True})
    again = client.post(chat, json={**body, "max_tokens": 10, "ignore_eos": True})
    bad = client.post(chat, json={**body, "temperature": 5})
    missing = client.post(chat, json={**body, "model": "nope"})
    assert (ok.status_code, again.status_code, bad.status_code) == (200, 200, 400)
    assert missing.status_code == 404
    after = _scrape(client)

    def delta(key) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(_requests(chat, 200)) == 2
    assert delta(_requests(chat, 400)) == 1
    assert delta(_requests(chat, 404)) == 1
    usages = [ok.json()["usage"], again.json()["usage"]]
    assert delta(("moeserve_prompt_tokens_total", ())) == sum(u["prompt_tokens"] for u in usages)
    assert delta(("moeserve_generation_tokens_total", ())) == 20
    hits = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert hits > 0  # the second, identical prompt reuses the first one's cache
    assert delta(("moeserve_prompt_cache_hit_tokens_total", ())) == hits
    assert delta(("moeserve_time_to_first_token_seconds_count", ())) == 2
    assert 2 <= delta(("moeserve_inter_token_latency_seconds_count", ())) <= 18
    assert delta(("moeserve_time_to_first_token_seconds_sum", ())) > 0
    assert after["moeserve_running_sequences", ()] == 0
    assert after["moeserve_waiting_sequences", ()] == 0


def test_tokenize_detokenize_round_trip(client):
    text = "The quick brown fox jumps over the lazy dog. 42!"
    r = client.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 1
    assert body["max_model_len"] == 512
    back = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200
    assert back.json()["prompt"] == text


def test_tokenize_messages_follows_the_template(client):
    messages = [{"role": "user", "content": "hello"}]
    with_prompt = client.post("/tokenize", json={"messages": messages}).json()
    without = client.post(
        "/tokenize", json={"messages": messages, "add_generation_prompt": False}
    ).json()
    assert with_prompt["tokens"][: without["count"]] == without["tokens"]
    assert with_prompt["count"] > without["count"]
    text = client.post("/detokenize", json={"tokens": with_prompt["tokens"]}).json()["prompt"]
    assert "hello" in text


def test_detokenize_out_of_vocabulary(client):
    r = client.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tokens"


def test_docs_and_openapi(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for route in ROUTES:
        assert route in paths, route
    assert "post" in paths["/v1/chat/completions"]


def test_metrics_name_the_documentation_routes(client):
    before = _scrape(client)
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/no/such/path").status_code == 404
    after = _scrape(client)
    for route, status in (("/docs", 200), ("/openapi.json", 200), ("unmatched", 404)):
        key = _requests(route, status)
        assert after.get(key, 0.0) - before.get(key, 0.0) == 1, route


def test_tokenize_renders_tools_and_template_kwargs_like_a_chat_request(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    plain = client.post("/tokenize", json={"messages": messages}).json()
    with_tools = client.post("/tokenize", json={"messages": messages, "tools": [tool]}).json()
    assert with_tools["count"] > plain["count"]  # the template announced the tool
    text = client.post("/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"]
    assert "get_weather" in text
    body = {"model": "tiny", "messages": messages, "tools": [tool], "max_tokens": 1}
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] == with_tools["count"]
    kwargs = client.post(
        "/tokenize", json={"messages": messages, "chat_template_kwargs": {"unused_flag": True}}
    ).json()
    assert kwargs["tokens"] == plain["tokens"]  # accepted; this template ignores the flag
