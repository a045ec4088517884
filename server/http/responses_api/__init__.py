"""The OpenAI Responses API (``/v1/responses``), translated into the one chat pipeline.

``protocol.py`` validates request bodies, ``objects.py`` holds the response object, its output
items and its stream events, ``translate.py`` turns a request (and the stored conversation it
continues) into a ``ChatCompletionRequest`` and the generated text back into output items,
``stream.py`` writes the ``response.*`` events and ``store.py`` keeps finished responses for
``previous_response_id`` and ``GET``. The route is ``server/http/routes/responses.py``.
"""
