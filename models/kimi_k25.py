"""Kimi-K2.5 (``kimi_k25``): Moonshot's multimodal model, served as its DeepSeek-V3 text model.

Kimi-K2.5 wraps a vision tower (MoonViT) and a projector around a Kimi-K2 language model,
which is a DeepSeek-V3 model (``models/deepseek_v3.py``: MLA, 384 routed experts, one dense
layer, YaRN). ``config.json`` nests the language model's keys under ``text_config`` (whose
own ``model_type`` says ``kimi_k2``; transformers reads it as ``deepseek_v3``), and the
checkpoint prefixes its tensors: ``language_model.model.*``, ``language_model.lm_head.*``,
``vision_tower.*``, ``mm_projector.*`` (mlx-lm's conversions keep the same names). This file
reads the text configuration out of ``text_config`` and maps the language model's tensors to
DeepSeek-V3's names; the vision tensors are dropped. Source: Moonshot AI, "Kimi K2: Open
Agentic Intelligence" (arXiv:2507.20534) for the language model.

This file does not do: images or video (the vision tower and projector are not loaded, so a
request can only be text), or the INT4 compressed-tensors experts of Moonshot's own release
(``weight_packed``/``weight_scale``), which the loader does not read: load a float or an MLX
conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moeserve.models import deepseek_v3
from moeserve.models.base import BaseModelArgs
from moeserve.models.errors import ConfigError
from moeserve.models.sanitize import drop_prefixes

# Tensors of the image and video path (and names other conversions give it).
_VISION = ("vision_tower.", "vision_model.", "mm_projector.", "multi_modal_projector.")
# The language model's prefixes -> DeepSeek-V3's.
_TEXT = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    """The language model's configuration: ``text_config``, read as DeepSeek-V3's."""

    model_type: str = "kimi_k25"  # registry key

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseModelArgs:
        """Build the arguments from ``config.json``'s ``text_config``.

        ``tie_word_embeddings`` is taken from the top level when it is there (transformers
        ties the multimodal model's head by that key), else from ``text_config``.

        Args:
            config: The parsed ``config.json``.

        Returns:
            The arguments.

        Raises:
            ConfigError: No ``text_config``, or what ``deepseek_v3.ModelArgs`` rejects.
        """
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json for 'kimi_k25' has no text_config object")
        flat = {**text, "model_type": config.get("model_type", "kimi_k25")}
        if "tie_word_embeddings" in config:
            flat["tie_word_embeddings"] = config["tie_word_embeddings"]
        return super().from_dict(flat)


class Model(deepseek_v3.Model):
    """Kimi-K2.5's language model: DeepSeek-V3's, loaded from the multimodal checkpoint."""

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Keep the language model's tensors under DeepSeek-V3's names, then its sanitize.

        Args:
            weights: Checkpoint tensors by name (publisher or MLX layout; already renamed
                ones pass through, so sanitizing twice changes nothing).

        Returns:
            Tensors named as this model's parameters.
        """
        weights = drop_prefixes(weights, _VISION)
        renamed = {}
        for name, value in weights.items():
            for old, new in _TEXT.items():
                if name.startswith(old):
                    name = new + name.removeprefix(old)
                    break
            renamed[name] = value
        return super().sanitize(renamed)
