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

ACT_FNS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre", None)
ATTENTION_DIRS = ("causal", "bidirectional")
POSITIONS = ("standard", "rotary")
ATTN_TYPES = ("global", "local")
NO_CAP = -1.0  # TransformerLens's "no soft cap"

# TransformerLens fields that do not affect the forward pass of the models we support.
_IGNORED_TL_FIELDS = frozenset(
    """model_name original_architecture device n_devices seed init_mode init_weights initializer_range
    init_range checkpoint_index checkpoint_label_type checkpoint_value tokenizer_name
    tokenizer_prepends_bos default_prepend_bos use_hook_tokens use_attn_result use_split_qkv_input
    use_hook_mlp_in use_attn_in from_checkpoint
    load_in_4bit dtype post_embedding_ln experts_per_token num_experts n_params
    d_vocab_out_is_default tokenizer_padding_side
    relative_attention_max_distance relative_attention_num_buckets decoder_start_token_id
    trust_remote_code ungroup_grouped_query_attention scale_attn_by_inverse_layer_idx""".split()
)

# TransformerLens fields that change the forward pass: accepted only at the value we implement.
_REQUIRED_TL_VALUES: dict[str, tuple[Any, ...]] = {
    "use_attn_scale": (True,),
    "final_rms": (False,),
    "num_experts": (None,),
    "use_qk_norm": (False,),
}

# Fields added for the families beyond GPT-2, with their defaults: ``to_json`` writes one only when
# it differs from its default, so a GPT-2 config.json reads and writes as it always did.
_FAMILY_DEFAULTS: dict[str, Any] = {
    "rotary_dim": None,
    "rotary_base": 10000,
    "rotary_adjacent_pairs": False,
    "use_NTK_by_parts_rope": False,
    "NTK_by_parts_factor": 8.0,
    "NTK_by_parts_low_freq_factor": 1.0,
    "NTK_by_parts_high_freq_factor": 4.0,
    "NTK_original_ctx_len": 8192,
    "gated_mlp": False,
    "n_key_value_heads": None,
    "parallel_attn_mlp": False,
    "use_normalization_before_and_after": False,
    "attn_scores_soft_cap": NO_CAP,
    "output_logits_soft_cap": NO_CAP,
    "use_local_attn": False,
    "window_size": None,
    "attn_types": None,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a transformer of any family we run, named as in TransformerLens.

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
    # rotary positions: the first ``rotary_dim`` (default ``d_head``) dimensions of each query and key
    # head turn, in halves (Llama, NeoX) or in adjacent pairs (GPT-J); Llama-3 scaling as "NTK by parts"
    rotary_dim: int | None = None
    rotary_base: int | float = 10000
    rotary_adjacent_pairs: bool = False
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_factor: int | float = 8.0
    NTK_by_parts_low_freq_factor: int | float = 1.0
    NTK_by_parts_high_freq_factor: int | float = 4.0
    NTK_original_ctx_len: int = 8192
    gated_mlp: bool = False  # act(x W_gate) * (x W_in) + b_in, then W_out
    n_key_value_heads: int | None = None  # grouped-query attention: query head h reads key/value head h // group
    parallel_attn_mlp: bool = False  # attention and MLP both read the block's input (NeoX, GPT-J)
    use_normalization_before_and_after: bool = False  # Gemma-2: ln1_post, ln2_post on each output
    attn_scores_soft_cap: int | float = NO_CAP  # scores -> cap · tanh(scores / cap); -1: none
    output_logits_soft_cap: int | float = NO_CAP
    use_local_attn: bool = False  # layers whose attn_types entry is "local" see window_size positions
    window_size: int | None = None
    attn_types: tuple[str, ...] | list[str] | None = None  # a list (from JSON) becomes a tuple

    def __post_init__(self) -> None:
        if isinstance(self.attn_types, list):  # from JSON; the config is hashed as a static field
            object.__setattr__(self, "attn_types", tuple(self.attn_types))
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
        if self.positional_embedding_type not in POSITIONS:
            raise ExplainerError(
                f"positional_embedding_type {self.positional_embedding_type!r} is not supported; "
                "valid: 'standard' (learned absolute positions) or 'rotary'"
            )
        self._check_families()
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

    def _check_families(self) -> None:
        """The fields of the families beyond GPT-2: rotary, grouped heads, gates, caps, windows."""
        if self.positional_embedding_type == "rotary":
            rd = self.rotary_width
            if not isinstance(rd, int) or isinstance(rd, bool) or rd < 2 or rd % 2 or rd > self.d_head:
                raise ExplainerError(
                    f"config field 'rotary_dim' is {self.rotary_dim!r}; it must be an even number from 2 to "
                    f"d_head={self.d_head} (or null for every dimension of a head)"
                )
            if not (isinstance(self.rotary_base, (int, float)) and self.rotary_base > 1):
                raise ExplainerError(f"config field 'rotary_base' must be a number above 1, got {self.rotary_base!r}")
        kv = self.n_key_value_heads
        if kv is not None and (not isinstance(kv, int) or kv < 1 or self.n_heads % kv):
            raise ExplainerError(
                f"config field 'n_key_value_heads' is {kv!r}; it must divide n_heads={self.n_heads} "
                "(or be null for one key/value head per query head)"
            )
        if self.gated_mlp and self.attn_only:
            raise ExplainerError("config field 'gated_mlp' is true but so is attn_only; set one of them false")
        for name in ("attn_scores_soft_cap", "output_logits_soft_cap"):
            cap = getattr(self, name)
            if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not (cap == NO_CAP or cap > 0):
                raise ExplainerError(f"config field {name!r} must be a positive number or -1 (none), got {cap!r}")
        if self.use_local_attn:
            if not isinstance(self.window_size, int) or self.window_size < 1:
                raise ExplainerError(
                    f"config field 'window_size' is {self.window_size!r}; use_local_attn needs a positive window"
                )
            types = self.attn_types
            if types is None or len(types) != self.n_layers or any(t not in ATTN_TYPES for t in types):
                raise ExplainerError(
                    f"config field 'attn_types' is {list(types) if types else types!r}; use_local_attn needs one "
                    f"entry per layer ({self.n_layers}), each 'global' or 'local'"
                )

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (``n_heads`` unless grouped-query attention)."""
        return self.n_heads if self.n_key_value_heads is None else self.n_key_value_heads

    @property
    def rotary_width(self) -> int:
        """How many dimensions of each query/key head rotate (rotary positions only)."""
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    def window(self, layer: int) -> int | None:
        """How many positions (itself included) a query of ``layer`` sees; ``None``: all before it."""
        if self.use_local_attn and self.attn_types is not None and self.attn_types[layer] == "local":
            return self.window_size
        return None

    @staticmethod
    def cap(value: float) -> float | None:
        """A soft cap as a number, or ``None`` for TransformerLens's -1 (none)."""
        return None if value == NO_CAP else float(value)

    @property
    def vocab_out(self) -> int:
        """The size of the output vocabulary (``d_vocab`` unless ``d_vocab_out`` is set)."""
        return self.d_vocab if self.d_vocab_out == -1 else self.d_vocab_out

    def scored_flops(self, seq: int) -> float:
        """FLOPs of the forward pass that scores one prompt of ``seq`` tokens (multiply-adds as two):
        every layer's attention and MLP matrices at every position, the attention scores and their
        weighted sum, and the unembedding at the last position alone (what a score reads). An
        estimate of cost, not a count: norms, activations and the scrubbing's mixing are left out.

        >>> ModelConfig(n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=16, d_vocab=10, n_ctx=2).scored_flops(2)
        912.0
        """
        d, inner, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        mlp = 0 if self.attn_only else (3 if self.gated_mlp else 2) * d * (self.d_mlp or 0)
        per_token = self.n_layers * (2 * d * inner + 2 * d * kv + mlp)
        return float(2 * per_token * seq + 4 * self.n_layers * seq * seq * inner + 2 * d * self.vocab_out)

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
        """The ``config.json`` dictionary (TransformerLens field names); a field of the families beyond
        GPT-2 is written only where it differs from its default."""
        data = dataclasses.asdict(self)
        if data["attn_types"] is not None:
            data["attn_types"] = list(data["attn_types"])
        return {k: v for k, v in data.items() if k not in _FAMILY_DEFAULTS or v != _FAMILY_DEFAULTS[k]}

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
                        f"{key}={_REQUIRED_TL_VALUES[key][0]!r}"
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
