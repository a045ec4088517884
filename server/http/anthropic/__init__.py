"""Anthropic's Messages API, translated into moeserve's one conversation model.

``protocol.py`` holds the request bodies Anthropic clients send, ``translate.py`` turns them
into the OpenAI ``ChatCompletionRequest`` that ``routes/chat.start`` runs, ``content.py``
turns the generated text back into Anthropic content blocks, ``responses.py`` the response
bodies and stream events, ``stream.py`` the server-sent event stream and ``errors.py`` the
error envelope (every failure on a ``/v1/messages`` path is written in it). The routes live
in ``routes/messages.py``. Nothing here renders templates, parses tool-call markup or talks
to the engine thread: the shared chat pipeline does all three.
"""
