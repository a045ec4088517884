"""The engine: one thread owns MLX; scheduler, runner, sampler, output, prompt cache.

The scheduler and the sequences are pure Python; the runner runs the model; ``output.py``
turns tokens into text and events; ``prompt_cache.py`` (with ``prompt_cache_disk.py``,
``kv_io.py`` and ``session_keys.py``) keeps sessions' KV between turns. Nothing here knows
HTTP or OpenAI shapes.
"""
