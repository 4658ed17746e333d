"""Build a RASP program of ``tracr.compiler.lib``, compile it with tracr, and read the result as a
native :class:`~explainer.models.transformer.Transformer`.

See :mod:`explainer.zoo.tracr_import` for the conventions (tokens, positions, the readout of
categorical and numerical outputs). tracr is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from explainer.errors import ExplainerError, did_you_mean
from explainer.models.config import ModelConfig
from explainer.models.native import from_state_dict
from explainer.models.transformer import Transformer

LOGIT_SCALE = 10.0  # nats between the right output and the others
DEFAULT_VOCAB = ("a", "b", "c")
DEFAULT_MAX_SEQ_LEN = 5
DEFAULT_BOS = "BOS"
INSTALL_HINT = "tracr is not installed; install the extra: pip install 'explainer[tracr]'"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to call one ``tracr.compiler.lib`` function: ``build(lib, rasp, vocab, max_seq_len)``."""

    build: Callable[..., Any]
    arguments: str
    vocab: tuple = DEFAULT_VOCAB
    distinct: bool = False  # inputs must not repeat a token (the program needs unique keys)


RECIPES: dict[str, Recipe] = {
    "make_length": Recipe(lambda lib, rasp, v, n: lib.make_length(), "none"),
    "make_hist": Recipe(lambda lib, rasp, v, n: lib.make_hist(), "none"),
    "make_reverse": Recipe(lambda lib, rasp, v, n: lib.make_reverse(rasp.tokens), "sop=tokens"),
    "make_frac_prevs": Recipe(
        lambda lib, rasp, v, n: lib.make_frac_prevs(rasp.tokens == v[0]), "bools=(tokens == first vocab token)"
    ),
    "make_pair_balance": Recipe(
        lambda lib, rasp, v, n: lib.make_pair_balance(rasp.tokens, v[0], v[1]),
        "sop=tokens, open/close = first/second vocab token",
        vocab=("(", ")", "a"),
    ),
    "make_shuffle_dyck": Recipe(
        lambda lib, rasp, v, n: lib.make_shuffle_dyck(["()", "{}"]), "pairs=['()', '{}']", vocab=tuple("(){}")
    ),
    "make_shuffle_dyck2": Recipe(lambda lib, rasp, v, n: lib.make_shuffle_dyck2(), "none", vocab=tuple("(){}")),
    "make_sort_unique": Recipe(
        lambda lib, rasp, v, n: lib.make_sort_unique(rasp.tokens, rasp.tokens),
        "vals=keys=tokens (inputs never repeat a token)",
        vocab=(1, 2, 3, 4, 5, 6),
        distinct=True,
    ),
    "make_sort": Recipe(
        lambda lib, rasp, v, n: lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1),
        "vals=keys=tokens, max_seq_len, min_key=1 (numeric tokens)",
        vocab=(1, 2, 3, 4),
    ),
    "make_sort_freq": Recipe(lambda lib, rasp, v, n: lib.make_sort_freq(max_seq_len=n), "max_seq_len"),
    "shift_by": Recipe(lambda lib, rasp, v, n: lib.shift_by(1, rasp.tokens), "offset=1, sop=tokens"),
    "detect_pattern": Recipe(
        lambda lib, rasp, v, n: lib.detect_pattern(rasp.tokens, list(v[:2])), "sop=tokens, pattern=first two tokens"
    ),
    "make_count_less_freq": Recipe(lambda lib, rasp, v, n: lib.make_count_less_freq(2), "n=2"),
    "make_count": Recipe(lambda lib, rasp, v, n: lib.make_count(rasp.tokens, v[0]), "sop=tokens, token=first"),
}
UNSUPPORTED = {
    "make_nary_sequencemap": "it takes a Python function; build the SOp yourself and pass it to import_tracr"
}


def program_names() -> list[str]:
    """The ``tracr.compiler.lib`` functions the importer can call, sorted."""
    return sorted(RECIPES)


def _recipe(name: str) -> tuple[str, Recipe]:
    full = name if name in RECIPES or name in UNSUPPORTED else f"make_{name}"
    if full in UNSUPPORTED:
        raise ExplainerError(f"program {name!r} cannot be imported by name: {UNSUPPORTED[full]}")
    if full not in RECIPES:
        raise ExplainerError(f"unknown tracr program {name!r}; {did_you_mean(name, program_names())}")
    return full, RECIPES[full]


def parse_vocab(text: str) -> tuple:
    """``"a,b,c"`` → ``('a', 'b', 'c')``; all-integer lists become integers (``"1,2"`` → ``(1, 2)``).

    >>> parse_vocab("1, 2,3"), parse_vocab("a,b")
    ((1, 2, 3), ('a', 'b'))
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if len(items) < 2 or len(set(items)) != len(items):
        raise ExplainerError(f"--vocab {text!r} needs at least two distinct comma-separated tokens, e.g. a,b,c")
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        return tuple(items)


def _number_expressions(program) -> None:
    """Give the program's expressions ids 1, 2, ... in depth-first order.

    tracr names residual spaces ``{name}_{id}`` with ids from a process-wide counter, so the same
    program compiled twice would get other labels (and, through sorting, another residual order).
    """
    seen: dict[int, Any] = {}
    stack = [program]
    while stack:
        expr = stack.pop()
        if id(expr) in seen:
            continue
        seen[id(expr)] = expr
        stack.extend(reversed(list(expr.children)))
    for number, expr in enumerate(seen.values(), start=1):
        expr.__dict__["unique_id"] = number  # overrides the cached property


@dataclasses.dataclass
class Compiled:
    """A compiled tracr program with what the import needs to read it."""

    name: str
    program: Any
    assembled: Any
    vocab: tuple
    max_seq_len: int
    bos: str
    recipe: Recipe

    @property
    def categorical(self) -> bool:
        from tracr.rasp import rasp

        return rasp.is_categorical(self.program)

    @property
    def token_ids(self) -> dict:
        return dict(self.assembled.input_encoder.encoding_map)

    @property
    def outputs(self) -> list:
        """Output values in logit order (categorical programs)."""
        encoding = self.assembled.output_encoder.encoding_map
        return sorted(encoding, key=encoding.get)


def compile_program(
    program: str | Any,
    vocab: tuple | None = None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    bos: str = DEFAULT_BOS,
) -> Compiled:
    """Build ``tracr.compiler.lib.<program>`` (or take ``program``, a ``rasp.SOp``) and compile it
    with tracr. ``vocab`` defaults to the recipe's; an SOp needs one."""
    try:
        from tracr.compiler import compiling, lib
        from tracr.rasp import rasp
    except ImportError:
        raise ExplainerError(INSTALL_HINT) from None
    if isinstance(program, str):
        name, recipe = _recipe(program)
    elif isinstance(program, rasp.SOp):
        if vocab is None:
            raise ExplainerError("a RASP program given as an SOp needs its vocab, e.g. vocab=('a', 'b', 'c')")
        name, recipe = program.name, Recipe(lambda lib, rasp, v, n: program, "given as an SOp")
    else:
        raise ExplainerError(f"program must be a tracr.compiler.lib function name or a rasp.SOp, got {program!r:.80}")
    vocab = tuple(vocab) if vocab is not None else recipe.vocab
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ExplainerError(f"--max-seq-len must be a positive integer, got {max_seq_len!r}")
    if bos in vocab:
        raise ExplainerError(f"the BOS token {bos!r} is also in the vocabulary {list(vocab)}; pick another --bos")
    sop = recipe.build(lib, rasp, vocab, max_seq_len)
    _number_expressions(sop)
    try:
        assembled = compiling.compile_rasp_to_model(sop, set(vocab), max_seq_len, compiler_bos=bos)
    except (TypeError, ValueError, NotImplementedError, KeyError) as err:
        raise ExplainerError(
            f"tracr could not compile {name} with vocab {list(vocab)} and max_seq_len {max_seq_len} "
            f"({type(err).__name__}: {err}); {name} is called with {recipe.arguments}: "
            f"try its default vocab --vocab {','.join(map(str, recipe.vocab))}"
        ) from None
    return Compiled(name, sop, assembled, vocab, max_seq_len, bos, recipe)


def _params(compiled: Compiled) -> dict[str, dict[str, np.ndarray]]:
    return {k: {n: np.asarray(v, np.float32) for n, v in d.items()} for k, d in compiled.assembled.params.items()}


def _readout(compiled: Compiled, readout: dict[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """``W_U`` and ``b_U``: the projection onto the output space (see the module docstring)."""
    from tracr.craft import bases

    labels = compiled.assembled.residual_labels
    if compiled.categorical:
        w = np.zeros((len(labels), len(compiled.outputs)), np.float32)
        for i, value in enumerate(compiled.outputs):
            w[labels.index(str(bases.BasisDirection(compiled.program.label, value))), i] = LOGIT_SCALE
        return w, np.zeros(len(compiled.outputs), np.float32)
    assert readout is not None, "a numerical program needs its threshold and scale"
    s, theta = readout["scale"], readout["threshold"]
    w = np.zeros((len(labels), 2), np.float32)
    w[labels.index(compiled.program.label)] = (s, -s)
    return w, np.asarray([-s * theta, s * theta], np.float32)


def to_native(compiled: Compiled, readout: dict[str, float] | None = None) -> Transformer:
    """The compiled model as a native :class:`Transformer` (tracr's parameters, renamed)."""
    import jax

    tc = compiled.assembled.model_config
    if tc.layer_norm or tc.activation_function is not jax.nn.relu:
        raise ExplainerError("this tracr model uses LayerNorm or a non-ReLU MLP; the importer expects tracr's defaults")
    p = _params(compiled)
    d, h, k = len(compiled.assembled.residual_labels), tc.num_heads, tc.key_size
    tensors = {"embed.W_E": p["token_embed"]["embeddings"], "pos_embed.W_pos": p["pos_embed"]["embeddings"]}
    for layer in range(tc.num_layers):
        a, m, ours = f"transformer/layer_{layer}/attn/", f"transformer/layer_{layer}/mlp/", f"blocks.{layer}."
        for name, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            tensors[ours + f"attn.W_{name}"] = p[a + theirs]["w"].reshape(d, h, k).transpose(1, 0, 2)
            tensors[ours + f"attn.b_{name}"] = p[a + theirs]["b"].reshape(h, k)
        tensors[ours + "attn.W_O"] = p[a + "linear"]["w"].reshape(h, k, d)
        tensors[ours + "attn.b_O"] = p[a + "linear"]["b"]
        tensors[ours + "mlp.W_in"], tensors[ours + "mlp.b_in"] = p[m + "linear_1"]["w"], p[m + "linear_1"]["b"]
        tensors[ours + "mlp.W_out"], tensors[ours + "mlp.b_out"] = p[m + "linear_2"]["w"], p[m + "linear_2"]["b"]
    tensors["unembed.W_U"], tensors["unembed.b_U"] = _readout(compiled, readout)
    cfg = ModelConfig(
        n_layers=tc.num_layers,
        d_model=d,
        n_heads=h,
        d_head=k,
        d_mlp=tc.mlp_hidden_size,
        d_vocab=tensors["embed.W_E"].shape[0],
        n_ctx=tensors["pos_embed.W_pos"].shape[0],
        act_fn="relu",
        normalization_type=None,
        attention_dir="causal" if tc.causal else "bidirectional",
        d_vocab_out=tensors["unembed.W_U"].shape[1],
    )
    return from_state_dict(cfg, tensors, source=f"tracr {compiled.name}")
