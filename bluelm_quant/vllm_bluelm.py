"""BlueLM as a vLLM model: vLLM's LLaMA plus BlueLM's two differences (docs/BLUELM.md 1-2).

- the stable-embedding LayerNorm (`model.embed_layer_norm`, weight and bias, eps = rms_norm_eps)
  right after `embed_tokens`;
- RoPE frequencies from bluelm_quant's own `compute_bluelm_inv_freq` (default, linear, ntkmixed),
  so vLLM's cos/sin table holds exactly the values our transformers model computes.

Everything else is vLLM's LLaMA: fused QKV / gate-up projections, tensor-parallel layers, the
vocabulary-parallel embedding and lm_head, and GPTQ layers through vLLM's own quantization
(the quant_config vLLM builds from config.json reaches every Linear the way it does for LLaMA).
The embedding and lm_head row count comes from the checkpoint (see vllm_config.py).

vLLM imports this module lazily (ModelRegistry entry "bluelm_quant.vllm_bluelm:BlueLMForCausalLM").
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import PPMissingLayer

from .models.bluelm.configuration_bluelm import BlueLMConfig, BlueLMConfigError
from .models.bluelm.modeling_bluelm import compute_bluelm_inv_freq
from .vllm_config import check_servable

logger = logging.getLogger(__name__)

# One cos/sin table per distinct RoPE, shared by all layers (vLLM's get_rope caches the same way).
_ROPE_TABLES: dict[tuple, "BlueLMRotaryEmbedding"] = {}


class BlueLMRotaryEmbedding(RotaryEmbedding):
    """vLLM's rotate-half RoPE with the frequencies given, not derived from a base.

    vLLM builds cos/sin for positions 0..max_position-1 as position * inv_freq in fp32 and casts
    them to the model dtype: the same values BlueLMRotaryEmbedding computes on the fly.
    """

    def __init__(self, inv_freq: torch.Tensor, head_size: int, max_position: int, theta: float, dtype: torch.dtype):
        # Read by _compute_inv_freq, which the base constructor calls to build the table.
        self.bluelm_inv_freq = inv_freq.float()
        super().__init__(head_size, head_size, max_position, theta, True, dtype)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return self.bluelm_inv_freq


def bluelm_rotary_embedding(config: BlueLMConfig, head_size: int) -> BlueLMRotaryEmbedding:
    inv_freq, attention_scaling = compute_bluelm_inv_freq(config)
    if attention_scaling != 1.0:  # none of the served types scales; guard against a silent change
        raise BlueLMConfigError(f"rope_scaling {config.rope_parameters!r} scales attention; vLLM's BlueLM does not")
    if inv_freq.numel() * 2 != head_size:
        raise BlueLMConfigError(f"head_dim={config.head_dim} but attention heads are {head_size} wide")
    # Positions vLLM may send: the model's own context, or a longer max_model_len a user forced.
    max_position = max(config.context_length, get_current_vllm_config().model_config.max_model_len)
    theta = (config.rope_parameters or {}).get("rope_theta", BlueLMConfig.default_theta)
    dtype = torch.get_default_dtype()  # vLLM sets it to the model dtype while building the model
    key = (head_size, max_position, tuple(inv_freq.tolist()), dtype)
    if key not in _ROPE_TABLES:
        _ROPE_TABLES[key] = BlueLMRotaryEmbedding(inv_freq, head_size, max_position, theta, dtype)
    return _ROPE_TABLES[key]


class BlueLMAttention(LlamaAttention):
    def _init_rotary_emb(self, config: BlueLMConfig, quant_config) -> None:
        self.rotary_emb = bluelm_rotary_embedding(config, self.head_dim)


class BlueLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: BlueLMConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=BlueLMAttention)


class BlueLMModel(LlamaModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = BlueLMDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = vllm_config.model_config.hf_config
        self.use_stable_embedding = config.use_stable_embedding
        if self.use_stable_embedding:
            # Replicated on every tensor-parallel rank: it normalizes the full hidden vector that
            # the vocabulary-parallel embedding returns after its all-reduce.
            if get_pp_group().is_first_rank:
                self.embed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
            else:
                self.embed_layer_norm = PPMissingLayer()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # vLLM passes this function's output as `inputs_embeds` when it embeds ids itself (prompt
        # embeddings, multimodal); LlamaModel.forward then uses them as given, so the LayerNorm
        # belongs here and not in forward. User-supplied prompt embeddings must be post-LayerNorm.
        embeds = self.embed_tokens(input_ids)
        return self.embed_layer_norm(embeds) if self.use_stable_embedding else embeds


class BlueLMForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        check_servable(config)
        rows = vllm_config.model_config.get_vocab_size()
        if config.vocab_size != rows:
            # The engine sizes logits by get_vocab_size() (the checkpoint's rows, vllm_config.py);
            # the LLaMA blocks size embed_tokens / lm_head by hf_config.vocab_size: align them.
            logger.info("config vocab_size=%d but the checkpoint's embedding has %d rows; using %d",
                        config.vocab_size, rows, rows)
            config.vocab_size = rows
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=BlueLMDecoderLayer)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = BlueLMDecoderLayer):
        return BlueLMModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._check_vocab_rows(weights))

    def _check_vocab_rows(self, weights):
        """vLLM's own check is a bare assert; say which tensor and what to pass instead."""
        rows = self.config.vocab_size
        for name, tensor in weights:
            if name in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] != rows:
                raise BlueLMConfigError(
                    f"{name} has {tensor.shape[0]} rows but vocab_size is {rows} (config.json; the checkpoint "
                    f"was not read as a local directory): pass hf_overrides={{'vocab_size': {tensor.shape[0]}}}"
                )
            yield name, tensor


__all__ = ["BlueLMForCausalLM", "BlueLMModel", "BlueLMRotaryEmbedding", "bluelm_rotary_embedding"]
