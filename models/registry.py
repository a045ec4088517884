"""The model-type registry: ``config.json``'s ``model_type`` -> the module implementing it.

Adding an architecture is one new file under ``models/`` plus one line in ``_MODULES``.
Modules are imported lazily so that starting the server pays only for the model it serves.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from moeserve.models.errors import UnsupportedModelError

# model_type -> module under models/. Each module defines ``ModelArgs`` and ``Model``.
_MODULES: dict[str, str] = {
    "qwen2_moe": "moeserve.models.qwen2_moe",
    "glm4_moe": "moeserve.models.glm4_moe",
    "bailing_moe": "moeserve.models.bailing_moe",
    "granitemoe": "moeserve.models.granitemoe",
    "dbrx": "moeserve.models.dbrx",
    "gpt_oss": "moeserve.models.gpt_oss",
    "deepseek_v3": "moeserve.models.deepseek_v3",
    "kimi_k25": "moeserve.models.kimi_k25",
    "glm4_moe_lite": "moeserve.models.glm4_moe_lite",
    "qwen3_next": "moeserve.models.qwen3_next",
    "qwen3_5_moe": "moeserve.models.qwen3_5_moe",
    "minimax_m2": "moeserve.models.minimax_m2",
    "qwen3_moe": "moeserve.models.qwen3_moe",
    "mixtral": "moeserve.models.mixtral",
}

# Other names for a supported type: the ``architectures`` class names that publishers put in
# config.json, so a config whose ``model_type`` is missing or spelled by class still resolves.
_ALIASES: dict[str, str] = {
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "BailingMoeForCausalLM": "bailing_moe",
    "GraniteMoeForCausalLM": "granitemoe",
    "DbrxForCausalLM": "dbrx",
    "GptOssForCausalLM": "gpt_oss",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "kimi_k2": "deepseek_v3",  # Kimi-K2's own configs: a DeepSeek-V3 model by another name
    "KimiK25ForConditionalGeneration": "kimi_k25",
    "Kimi_K25ForConditionalGeneration": "kimi_k25",  # transformers' class name
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",  # transformers' text-only class (flat config)
    "qwen3_5_moe_text": "qwen3_5_moe",  # that flat config's model_type
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "minimax": "minimax_m2",  # mlx-lm's name; MiniMax-Text-01 configs are refused by ModelArgs
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


def registered_model_types() -> list[str]:
    """The model types with a module (no aliases), in registration order.

    Returns:
        The names.
    """
    return list(_MODULES)


def supported_model_types() -> list[str]:
    """The model types we can load, aliases included.

    Returns:
        Sorted list of names.
    """
    return sorted([*_MODULES, *_ALIASES])


def canonical_model_type(model_type: str) -> str:
    """Resolve an alias to the registered name.

    Args:
        model_type: As found in ``config.json``.

    Returns:
        The registered model type.

    Raises:
        UnsupportedModelError: The type is unknown; the message lists the supported ones.
    """
    name = _ALIASES.get(model_type, model_type)
    if name not in _MODULES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(supported_model_types())
        )
    return name


def get_model_module(model_type: str) -> ModuleType:
    """Import the module implementing ``model_type``.

    Args:
        model_type: As found in ``config.json`` (aliases accepted).

    Returns:
        The module, which defines ``ModelArgs`` and ``Model``.
    """
    return importlib.import_module(_MODULES[canonical_model_type(model_type)])
