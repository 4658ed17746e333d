"""Model configuration, with TransformerLens ``HookedTransformerConfig`` field names and meanings.

The native model format (see :mod:`explainer.models.native`) stores this as ``config.json``. Fields
that TransformerLens writes but that do not change the forward pass (``model_name``, ``device``,
``seed`` ...) are accepted and ignored; fields that would change the forward pass must hold the
value we implement, otherwise loading fails with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from explainer.errors import ExplainerError, did_you_mean

ACT_FNS = ("relu", "gelu", "gelu_new")
NORMALIZATIONS = ("LN", "LNPre", None)
ATTENTION_DIRS = ("causal", "bidirectional")

# TransformerLens fields that do not affect the forward pass of the models we support.
_IGNORED_TL_FIELDS = frozenset(
    """model_name original_architecture device n_devices seed init_mode init_weights initializer_range
    init_range checkpoint_index checkpoint_label_type checkpoint_value tokenizer_name
    tokenizer_prepends_bos default_prepend_bos use_hook_tokens use_attn_result use_split_qkv_input
    use_hook_mlp_in use_attn_in use_local_attn window_size attn_types from_checkpoint
    load_in_4bit dtype post_embedding_ln experts_per_token num_experts n_params
    use_normalization_before_and_after d_vocab_out_is_default tokenizer_padding_side
    relative_attention_max_distance relative_attention_num_buckets decoder_start_token_id
    NTK_by_parts_factor NTK_by_parts_high_freq_factor NTK_by_parts_low_freq_factor
    NTK_original_ctx_len use_NTK_by_parts_rope rotary_adjacent_pairs rotary_base rotary_dim
    trust_remote_code ungroup_grouped_query_attention scale_attn_by_inverse_layer_idx
    output_logits_soft_cap attn_scores_soft_cap""".split()
)

# TransformerLens fields that change the forward pass: accepted only at the value we implement.
_REQUIRED_TL_VALUES: dict[str, tuple[Any, ...]] = {
    "use_attn_scale": (True,),
    "gated_mlp": (False,),
    "parallel_attn_mlp": (False,),
    "final_rms": (False,),
    "n_key_value_heads": (None,),
    "num_experts": (None,),
    "original_architecture": (None, "GPT2LMHeadModel", "explainer"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a GPT-2-style transformer, named as in TransformerLens.

    ``d_vocab_out = -1`` means the output vocabulary equals ``d_vocab`` (TransformerLens's
    convention). ``attn_scale`` defaults to ``sqrt(d_head)``.

    >>> cfg = ModelConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=3,
    ...                   attn_only=True)
    >>> cfg.sites
    ('blocks.0.attn.in', 'unembed.in')
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None = None
    act_fn: str = "gelu_new"
    normalization_type: str | None = "LN"
    eps: float = 1e-5
    attn_only: bool = False
    positional_embedding_type: str = "standard"
    attention_dir: str = "causal"
    d_vocab_out: int = -1
    attn_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ExplainerError(f"config field {name!r} must be a positive integer, got {value!r}")
        if not self.attn_only:
            if not isinstance(self.d_mlp, int) or self.d_mlp < 1:
                raise ExplainerError(
                    f"config field 'd_mlp' must be a positive integer when attn_only is false, "
                    f"got {self.d_mlp!r}; set d_mlp or set attn_only to true"
                )
            if self.act_fn not in ACT_FNS:
                raise ExplainerError(
                    f"config field 'act_fn' is {self.act_fn!r}; {did_you_mean(str(self.act_fn), ACT_FNS)}"
                )
        if self.normalization_type not in NORMALIZATIONS:
            raise ExplainerError(
                f"config field 'normalization_type' is {self.normalization_type!r}; valid: 'LN', 'LNPre' or null"
            )
        if self.positional_embedding_type != "standard":
            raise ExplainerError(
                f"positional_embedding_type {self.positional_embedding_type!r} is not supported; "
                "only 'standard' (learned absolute positions) is"
            )
        if self.attention_dir not in ATTENTION_DIRS:
            raise ExplainerError(
                f"config field 'attention_dir' is {self.attention_dir!r}; valid: causal, bidirectional"
            )
        if self.d_vocab_out != -1 and (not isinstance(self.d_vocab_out, int) or self.d_vocab_out < 1):
            raise ExplainerError(
                f"config field 'd_vocab_out' must be -1 (same as d_vocab) or a positive integer, "
                f"got {self.d_vocab_out!r}"
            )
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ExplainerError(f"config field 'eps' must be a positive number, got {self.eps!r}")

    @property
    def vocab_out(self) -> int:
        """The size of the output vocabulary (``d_vocab`` unless ``d_vocab_out`` is set)."""
        return self.d_vocab if self.d_vocab_out == -1 else self.d_vocab_out

    @property
    def scale(self) -> float:
        """The divisor of attention scores."""
        return float(self.attn_scale) if self.attn_scale is not None else float(self.d_head) ** 0.5

    @property
    def sites(self) -> tuple[str, ...]:
        """Every read site, in forward order."""
        names: list[str] = []
        for layer in range(self.n_layers):
            names.append(f"blocks.{layer}.attn.in")
            if not self.attn_only:
                names.append(f"blocks.{layer}.mlp.in")
        names.append("unembed.in")
        return tuple(names)

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` dictionary (TransformerLens field names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "config.json") -> ModelConfig:
        """Parse a ``config.json`` dictionary, with errors that name the field and the fix."""
        if not isinstance(data, dict):
            raise ExplainerError(f"{source} must hold a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif key in _REQUIRED_TL_VALUES:
                if value not in _REQUIRED_TL_VALUES[key]:
                    raise ExplainerError(
                        f"{source}: {key}={value!r} is not supported; explainer implements "
                        f"{key}={_REQUIRED_TL_VALUES[key][0]!r} (GPT-2-style blocks)"
                    )
            elif key not in _IGNORED_TL_FIELDS:
                raise ExplainerError(f"{source}: unknown field {key!r}; {did_you_mean(key, sorted(fields))}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ExplainerError(f"{source} is missing required field(s) {missing}; add them")
        if kwargs.get("attn_only") is False and kwargs.get("d_mlp") is None and "d_mlp" not in data:
            raise ExplainerError(f"{source} is missing 'd_mlp'; it is required unless attn_only is true")
        try:
            return cls(**kwargs)
        except TypeError as err:  # a field of the wrong type, caught by a type checker before our checks
            raise ExplainerError(f"{source}: {err}") from None
