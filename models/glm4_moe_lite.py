"""GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's latent attention with GLM-4.5's MoE.

Architecturally a DeepSeek-V3 model (``models/deepseek_v3.py``): multi-head latent attention
(``layers/mla.py``; GLM-4.7-Flash's keys are 192 + 64 wide and its values 256, over a
512-wide latent) and, after one dense layer, the sigmoid-routed MoE block with shared experts
that GLM-4.5 took from DeepSeek-V3 (``models/glm4_moe.py``). What differs is configuration:
transformers' ``Glm4MoeLiteConfig`` defaults (one expert group, ``routed_scaling_factor``
1.8, ``rms_norm_eps`` 1e-5), and which layers are dense, which transformers reads from
``mlp_layer_types`` (a ``"dense"``/``"sparse"`` list; by default only layer 0 is dense) while
the published ``config.json`` says ``first_k_dense_replace`` 1. The checkpoint carries one
MTP layer after the decoder layers, dropped at load. Sources: Z.ai's GLM-4.7-Flash release
(no report of its own); GLM-4.5 (arXiv:2508.06471) for the MoE block; DeepSeek-V2
(arXiv:2405.04434) for MLA.

One disagreement between references: transformers normalises the query and key latents
(``q_a_layernorm``, ``kv_a_layernorm``) with epsilon 1e-6, mlx-lm and vLLM with
``rms_norm_eps`` (1e-5). We follow transformers, our parity reference
(``layers.mla.LATENT_NORM_EPS``); the two differ by about 1e-5 relative on those norms.

This file does not do: the MTP layer, or anything ``models/deepseek_v3.py`` does not do.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.models import deepseek_v3


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    """GLM-4.7-Flash configuration; defaults are transformers' ``Glm4MoeLiteConfig``.

    Every field is DeepSeek-V3's (see ``deepseek_v3.ModelArgs``); those redeclared here only
    change their defaults, and ``mlp_layer_types`` is new.
    """

    model_type: str = "glm4_moe_lite"  # registry key
    q_lora_rank: int | None = 768  # Q, query bottleneck
    first_k_dense_replace: int = 1  # layers [0, k) are dense when mlp_layer_types is absent
    n_group: int = 1  # no group pruning
    topk_group: int = 1  # no group pruning
    routed_scaling_factor: float = 1.8  # multiplier on the routed experts' weights
    rms_norm_eps: float = 1e-5  # epsilon of the layer and final RMSNorms
    max_position_embeddings: int = 202752  # context length
    mlp_layer_types: list[str] | None = None  # per layer "dense" or "sparse"; wins when given

    def __post_init__(self) -> None:
        super().__post_init__()
        kinds = self.mlp_layer_types
        if kinds is not None and (
            len(kinds) != self.num_hidden_layers or set(kinds) - {"dense", "sparse"}
        ):
            raise ValueError(
                f"mlp_layer_types must name 'dense' or 'sparse' for each of the "
                f"{self.num_hidden_layers} layers, got {kinds!r}"
            )

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has the MoE block (else the dense MLP).

        Args:
            layer: Layer index from 0.

        Returns:
            ``mlp_layer_types[layer] == "sparse"`` when the config lists the types, else
            ``layer >= first_k_dense_replace``.
        """
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer] == "sparse"
        return super().is_sparse(layer)


class Model(deepseek_v3.Model):
    """GLM-4.7-Flash causal language model: DeepSeek-V3's, with this family's ``ModelArgs``."""
