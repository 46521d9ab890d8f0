"""BlueLM-7B as a native transformers model (no trust_remote_code).

BlueLM is LLaMA plus two things (docs/BLUELM.md sections 1-2): a LayerNorm with weight and bias
right after the token embedding ("stable embedding"), and an extra RoPE variant, `ntkmixed`.
Attention and MLP are exactly LLaMA's, so we reuse transformers' blocks and keep only the
BlueLM-specific parts here. State-dict names match the published checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_bluelm import BlueLMConfig


def keep_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are wanted: the last `logits_to_keep` (0 keeps all), or the
    positions a 1-D index tensor names. transformers has a helper for this only since 5.21,
    and we support older releases (vLLM pins transformers < 5.20)."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
    if logits_to_keep.ndim != 1:
        raise ValueError(f"logits_to_keep must be an int or a 1-D index tensor, got shape {tuple(logits_to_keep.shape)}")
    return hidden_states[:, logits_to_keep, :]


class BlueLMRMSNorm(nn.Module):
    """RMSNorm: variance in fp32, normalized value cast back to the weight dtype, then times weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def default_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/d), j = 0..d/2-1 (NeoX rotate-half convention)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def ntkmixed_inv_freq(theta: float, dim: int, factor: float, power: float, device=None) -> torch.Tensor:
    """BlueLM-32K's mixed NTK scaling: inv_freq_j / exp(a * (j+1)^b), a = ln(k) / (d/2)^b.

    Low-frequency dimensions (large j) are stretched by up to the full factor k, high-frequency ones
    almost not at all; the power b sets how fast the stretch grows along j.
    """
    half = dim // 2
    a = math.log(factor) / (half**power)
    j = torch.arange(half, dtype=torch.float64, device=device)
    stretch = torch.exp(a * (j + 1) ** power)
    return (default_inv_freq(theta, dim, device).double() / stretch).float()


def compute_bluelm_inv_freq(config: BlueLMConfig, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for the config's RoPE type, validated by BlueLMConfig."""
    params = config.rope_parameters or {}
    rope_type = config.rope_type
    theta = params.get("rope_theta", BlueLMConfig.default_theta)
    if rope_type == "default":
        return default_inv_freq(theta, config.head_dim, device), 1.0
    if rope_type == "ntkmixed":
        return ntkmixed_inv_freq(theta, config.head_dim, params["factor"], params["power"], device), 1.0
    # linear / dynamic have their standard transformers meaning.
    return ROPE_INIT_FUNCTIONS[rope_type](config, device)


class BlueLMRotaryEmbedding(nn.Module):
    """cos/sin for rotate-half RoPE.

    ntkmixed is static: the original precomputes a cos/sin table over 2048 * int(factor)
    positions from fixed inv_freq; computing position * inv_freq on the fly in fp32 gives the same
    values for every position inside that table.
    """

    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_type
        # Read by transformers' dynamic_rope_update for the "dynamic" type.
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = compute_bluelm_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class BlueLMAttention(LlamaAttention):
    """LLaMA attention (q/k/v/o without bias, scale 1/sqrt(head_dim), SDPA by default)."""


class BlueLMMLP(LlamaMLP):
    """down(silu(gate(x)) * up(x)), no biases."""


class BlueLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BlueLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = BlueLMAttention(config=config, layer_idx=layer_idx)
        self.mlp = BlueLMMLP(config)
        self.input_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class BlueLMPreTrainedModel(PreTrainedModel):
    config_class = BlueLMConfig
    config: BlueLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlueLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": BlueLMDecoderLayer, "attentions": BlueLMAttention}

    def _init_weights(self, module: nn.Module) -> None:
        # The generic initializer looks RoPE types up in transformers' table, which has no ntkmixed.
        if isinstance(module, BlueLMRotaryEmbedding):
            inv_freq, _ = compute_bluelm_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        else:
            super()._init_weights(module)


class BlueLMModel(BlueLMPreTrainedModel):
    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.use_stable_embedding:
            self.embed_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(
            [BlueLMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BlueLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BlueLMRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`inputs_embeds`, when given, are raw `embed_tokens` rows: the stable-embedding
        LayerNorm is applied to them as it is to looked-up ids."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.use_stable_embedding:
            inputs_embeds = self.embed_layer_norm(inputs_embeds)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class BlueLMForCausalLM(BlueLMPreTrainedModel, GenerationMixin):
    # Only tied when a config asks for it; BlueLM's published configs keep lm_head separate.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BlueLMConfig) -> None:
        super().__init__(config)
        self.model = BlueLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = keep_positions(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "BlueLMForCausalLM",
    "BlueLMModel",
    "BlueLMPreTrainedModel",
    "BlueLMRMSNorm",
    "BlueLMRotaryEmbedding",
    "compute_bluelm_inv_freq",
    "default_inv_freq",
    "ntkmixed_inv_freq",
]
