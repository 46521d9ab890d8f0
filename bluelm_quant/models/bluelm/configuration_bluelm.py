"""BlueLMConfig: the published BlueLM config.json keys as a native transformers config.

Facts from docs/BLUELM.md section 1-2. The published config.json carries `rope_theta` and
`rope_scaling` (null or `{"type": "ntkmixed", "factor": 16.0, "power": 0.3}`); transformers
5.x standardizes both into `rope_parameters`, which is what we store and save.
"""
# No `from __future__ import annotations`: strict dataclass validation needs real type objects.
import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# RoPE variants we implement; anything else must fail loudly instead of silently
# running plain RoPE (the model would load and then produce gibberish past 2K tokens).
ROPE_TYPES = ("default", "linear", "dynamic", "ntkmixed")
# Keys each variant accepts besides the bookkeeping ones transformers adds.
_ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"}, "ntkmixed": {"factor", "power"}}
_ROPE_BOOKKEEPING = {"type", "rope_type", "rope_theta"}
# ntkmixed precomputes cos/sin over this many positions per unit of factor (docs/BLUELM.md section 2).
NTKMIXED_BASE_POSITIONS = 2048


class BlueLMConfigError(ValueError):
    """A BlueLM config value that the model cannot run with."""


# @strict runs every validate_* method after __init__ (and transformers runs them again at save).
@strict
class BlueLMConfig(PreTrainedConfig):
    model_type = "BlueLM"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 100096
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 3
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    use_stable_embedding: bool = True
    rope_parameters: dict | None = None
    # Read by the shared LLaMA attention/MLP blocks; BlueLM has no biases and no dropout.
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        raw = kwargs.get("rope_scaling", None)
        if raw is None:
            raw = self.rope_parameters
        if raw is not None and not isinstance(raw, dict):
            raise BlueLMConfigError(
                f"rope_scaling must be null or a dict such as "
                f'{{"type": "ntkmixed", "factor": 16.0, "power": 0.3}}, got {raw!r}'
            )
        # transformers fills the dict in place; copy so a caller's dict is never mutated.
        if "rope_scaling" in kwargs and kwargs["rope_scaling"] is not None:
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        elif self.rope_parameters is not None:
            self.rope_parameters = dict(self.rope_parameters)
        super().__post_init__(**kwargs)
        # Check here too: strict validation wraps errors in a non-ValueError exception type.
        self.validate_rope()

    def validate_rope(self) -> None:
        """Reject RoPE settings we do not implement; also run by transformers at save time."""
        params = self.rope_parameters or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if "type" in params and "rope_type" in params and params["type"] != params["rope_type"]:
            raise BlueLMConfigError(
                f"rope_scaling has type={params['type']!r} but rope_type={params['rope_type']!r}; keep one of them"
            )
        if rope_type not in ROPE_TYPES:
            raise BlueLMConfigError(
                f"unknown rope_scaling type {rope_type!r} in {params!r}; BlueLM supports {list(ROPE_TYPES)}"
            )
        allowed = _ROPE_KEYS[rope_type] | _ROPE_BOOKKEEPING
        missing = _ROPE_KEYS[rope_type] - set(params)
        extra = set(params) - allowed
        if missing or extra:
            raise BlueLMConfigError(
                f"rope_scaling {params!r} of type {rope_type!r} needs exactly the keys "
                f"{sorted(_ROPE_KEYS[rope_type])}; missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        if "factor" in params:
            factor = params["factor"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0:
                raise BlueLMConfigError(f"rope_scaling factor must be a number >= 1, got {factor!r} in {params!r}")
        if "power" in params:
            power = params["power"]
            if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
                raise BlueLMConfigError(f"rope_scaling power must be a finite number >= 0, got {power!r} in {params!r}")
        if self.head_dim % 2:
            raise BlueLMConfigError(f"rotary embedding needs an even head_dim, got {self.head_dim}")

    def validate_architecture(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise BlueLMConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise BlueLMConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def rope_type(self) -> str:
        params = self.rope_parameters or {}
        return params.get("rope_type", params.get("type", "default"))

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant to see (prompt + generated tokens)."""
        if self.rope_type == "ntkmixed":
            table = NTKMIXED_BASE_POSITIONS * int(self.rope_parameters["factor"])
            return max(self.max_position_embeddings, table)
        return self.max_position_embeddings


__all__ = ["BlueLMConfig", "BlueLMConfigError", "ROPE_TYPES", "NTKMIXED_BASE_POSITIONS"]
