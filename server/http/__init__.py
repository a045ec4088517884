"""The HTTP side: the app, its middleware, the wire types, error envelopes and the routes.

``app.py`` assembles; ``routes/`` holds one module per API (chat, completions, models, the
operational routes) and what they share; ``protocol.py`` and ``responses.py`` the OpenAI wire
types, requests and responses (``responses_api/`` those of the Responses API, with its
translation into a chat request and its store); ``context_length.py`` the context check;
``errors.py`` the envelope every failure leaves in; ``limits.py`` and ``drain.py`` the body
limit and the graceful shutdown; ``deps.py`` the runtime as a dependency; ``metrics.py`` Prometheus.
It talks to the engine through ``GenerationRequest`` and events only, and renders prompts
through ``server.text``; it runs no MLX.
"""
