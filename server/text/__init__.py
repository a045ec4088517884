"""Text around the model: tokenizer, chat templates, and the tool-call and reasoning formats.

``tokenizer.py`` (loading, encode, EOS ids), ``detokenizer.py`` (the streaming
detokenizer), ``stop_strings.py`` (stop strings across chunks), ``chat_template.py``
(Hugging Face-compatible jinja2 rendering) and ``formats/`` (one class per tool-call or
reasoning format: detection, markers, streaming parser, constraint grammar, and their
registry). It knows strings, token ids and token texts; it does not know HTTP or the engine.
"""
