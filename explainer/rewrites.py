"""Rewrites: an MLP replaced by a fitted simpler function ``f`` plus its remainder, as one unit.

The seed's rewrite ``MLP(x) = f(x) + (MLP(x) − f(x))`` turns a question about a whole MLP into a
question about one number: does the task need anything the MLP computes beyond ``f``? The
remainder ``MLP(x) − f(x)`` becomes a site of its own, ``blocks.{l}.mlp.rest``, read by the block's
output with a single unit (its mask entry is broadcast over ``d_model``). An explanation may
exclude that unit, and then the remainder is *replaced*, like any excluded unit: by the remainder
computed on the resample input (or its mean, or zero, following the run's ablation), never simply
dropped. The adversary may re-include it. With the remainder kept the rewritten block computes
exactly the MLP (bit for bit), so a rewrite changes nothing until an explanation excludes it.

``f`` is affine, ``f(y) = y W + b`` on the MLP's input ``y`` (after the block's norm), fitted by
least squares to the MLP's outputs on the task's training prompts (clean and corrupt, every
position). Only what the MLP computes from ``y`` matters, so every kind of MLP is rewritten alike:
plain (GPT-2, NeoX) or gated (Llama's SiLU gate, Gemma's tanh-GELU gate: ``f`` stands in for the
whole ``act(y W_gate) ⊙ (y W_in)`` path; the gate is no unit of its own). Gemma-2's post-norm
normalises ``f(y)`` plus the remainder, as it normalises the MLP's output. Forms:

- ``linear`` (default): the least-squares affine fit;
- ``rank-R``: the best rank-``R`` fit (reduced-rank regression: the linear fit projected onto the
  top ``R`` principal directions of its fitted outputs), e.g. ``rank-2``;
- ``mean``: the constant mean output (``W = 0``): excluding the remainder then asks whether the
  MLP's output matters at all.

A rewrite is written ``blocks.L.mlp=FORM`` (``--rewrite`` on the command line, ``rewrites`` in a
config), or ``mlps=FORM`` for every MLP. How much of the behaviour ``f`` carries is measured by
:func:`carried` and saved with the run; the fitted ``W`` and ``b`` are saved in the run folder
(``rewrites.safetensors``), so every command rebuilds the same model.

>>> import jax.numpy as jnp
>>> from explainer.models import load_model
>>> from explainer.zoo import resolve_model
>>> from explainer.tasks import resolve_task
>>> folder = resolve_model("planted-joint")
>>> net = rewrite(load_model(folder), resolve_task(None, folder).train_data(), ["blocks.0.mlp=linear"])
>>> net.sites
('blocks.0.attn.in', 'blocks.0.mlp.in', 'blocks.0.mlp.rest', 'unembed.in')
>>> tokens = jnp.array([[0, 4], [2, 5]])
>>> bool((net(tokens) == load_model(folder)(tokens)).all())  # remainder kept: the same model
True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from explainer.errors import ExplainerError, did_you_mean
from explainer.models.config import ModelConfig
from explainer.models.transformer import MLP, GatedMLP, Resid, Transformer, _norm
from explainer.tasks.base import Batch

FORMS = ("linear", "rank-R", "mean")
REST = ".mlp.rest"
TENSORS_FILE = "rewrites.safetensors"
MAX_FIT_PROMPTS = 2048
_SPEC = re.compile(r"(?:blocks\.(\d+)\.mlp|mlps)(?:=(.*))?")

BAD_SPEC = (
    "rewrite {spec!r} is not of the form blocks.L.mlp=FORM (or mlps=FORM for every MLP), "
    "e.g. --rewrite blocks.0.mlp=linear; forms: linear, rank-R (e.g. rank-2), mean"
)


class Rewrite(MLP):
    """An MLP that also carries its fitted affine stand-in ``f(y) = y W_f + b_f``.

    Called, it is the original MLP; the forward pass (:meth:`Transformer.run`) reads its
    remainder ``MLP(y) − f(y)`` as the site ``blocks.{l}.mlp.rest``.
    """

    W_f: Float[Array, "d_model d_model"]
    b_f: Float[Array, " d_model"]
    form: str = eqx.field(static=True)

    def fitted(self, y: Resid) -> Resid:
        """``f(y)``: what the rewrite says the MLP computes."""
        return y @ self.W_f + self.b_f


class GatedRewrite(GatedMLP):
    """A gated MLP that also carries its fitted affine stand-in (as :class:`Rewrite`)."""

    W_f: Float[Array, "d_model d_model"]
    b_f: Float[Array, " d_model"]
    form: str = eqx.field(static=True)

    def fitted(self, y: Resid) -> Resid:
        """``f(y)``: what the rewrite says the gated MLP computes."""
        return y @ self.W_f + self.b_f


_REWRITE_OF = {MLP: Rewrite, GatedMLP: GatedRewrite}  # each kind of MLP and its rewritten kind


def is_rest(site: str) -> bool:
    """Whether ``site`` is a rewrite's remainder (one unit, not a residual)."""
    return site.endswith(REST)


def parse(spec: str) -> tuple[str, str]:
    """``(mlp, form)`` of one rewrite spec; ``mlp`` is ``blocks.L.mlp`` or ``mlps`` (every MLP).

    >>> parse("blocks.1.mlp=rank-2"), parse("mlps")
    (('blocks.1.mlp', 'rank-2'), ('mlps', 'linear'))
    """
    match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ExplainerError(BAD_SPEC.format(spec=spec))
    form = match[2] if match[2] is not None else "linear"
    if form not in ("linear", "mean") and not re.fullmatch(r"rank-[1-9]\d*", form):
        raise ExplainerError(
            f"unknown rewrite form {form!r} in {spec!r}; {did_you_mean(form, FORMS)} (R a positive integer)"
        )
    return ("mlps" if match[1] is None else f"blocks.{match[1]}.mlp"), form


def resolve(specs: Sequence[str] | None, config: ModelConfig) -> dict[str, str]:
    """``{mlp: form}`` for ``config``'s model: layers checked, ``mlps`` expanded, one form per MLP."""
    if not specs:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    mlps = [] if config.attn_only else [f"blocks.{i}.mlp" for i in range(config.n_layers)]
    out: dict[str, str] = {}
    for spec in specs:
        mlp, form = parse(spec)
        if not mlps:
            raise ExplainerError(f"rewrite {spec!r}: this model is attention-only, it has no MLP to rewrite")
        if mlp != "mlps" and mlp not in mlps:
            raise ExplainerError(f"rewrite {spec!r}: there is no {mlp}; this model has blocks 0-{config.n_layers - 1}")
        rank = int(form.removeprefix("rank-")) if form.startswith("rank-") else None
        if rank is not None and rank > config.d_model:
            raise ExplainerError(
                f"rewrite {spec!r}: rank {rank} exceeds d_model={config.d_model}; use rank-1 to rank-{config.d_model}"
            )
        for name in mlps if mlp == "mlps" else [mlp]:
            if out.get(name, form) != form:
                raise ExplainerError(f"{name} is rewritten twice ({out[name]} and {form}); give one form per MLP")
            out[name] = form
    return out


def fit_affine(y: np.ndarray, out: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(W, b)`` with ``y W + b ≈ out`` (rows are examples), of the given ``form``.

    >>> y = np.random.default_rng(0).normal(size=(50, 3))
    >>> w, b = fit_affine(y, y @ np.diag([1.0, 2.0, 3.0]) + 1.0, "rank-1")
    >>> int(np.linalg.matrix_rank(w)), bool(np.allclose(fit_affine(y, 2 * y, "linear")[0], 2 * np.eye(3)))
    (1, True)
    """
    y, out = np.asarray(y, np.float64), np.asarray(out, np.float64)
    y_mean, out_mean = y.mean(0), out.mean(0)
    if form == "mean":
        w = np.zeros((y.shape[1], out.shape[1]))
    else:
        w = np.linalg.lstsq(y - y_mean, out - out_mean, rcond=None)[0]
        if form.startswith("rank-"):
            rank = int(form.removeprefix("rank-"))
            _, _, vt = np.linalg.svd((y - y_mean) @ w, full_matrices=False)
            w = w @ vt[:rank].T @ vt[:rank]
    return w.astype(np.float32), (out_mean - y_mean @ w).astype(np.float32)


def _mlp_io(
    model: Transformer, tokens, layers: Sequence[int], chunk: int = 256
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The MLP's input (after LayerNorm) and output at every position of ``tokens``, per layer."""
    sites = tuple(f"blocks.{i}.mlp.in" for i in layers)

    @eqx.filter_jit
    def io(model, t):
        _, cache = model.run(t, capture=sites)
        out = {}
        for i in layers:
            block = model.blocks[i]
            y = _norm(block.ln2, cache[f"blocks.{i}.mlp.in"])
            out[i] = (y, block.mlp(y))
        return out

    parts = [io(model, tokens[start : start + chunk]) for start in range(0, tokens.shape[0], chunk)]
    d = model.config.d_model
    return {
        i: tuple(np.concatenate([np.asarray(p[i][j]).reshape(-1, d) for p in parts]) for j in (0, 1))  # type: ignore[misc]
        for i in layers
    }


def _fit_tokens(data: Batch) -> jax.Array:
    tokens = data.clean[:MAX_FIT_PROMPTS]
    if data.corrupt is not None:
        tokens = jnp.concatenate([tokens, data.corrupt[:MAX_FIT_PROMPTS]])
    return tokens


def _swap(model: Transformer, layer: int, w, b, form: str) -> Transformer:
    """``model`` with the MLP of block ``layer`` (of any kind) carrying ``f(y) = y w + b``."""
    mlp = model.blocks[layer].mlp
    kind = next(k for k in _REWRITE_OF if isinstance(mlp, k))  # an MLP or a gated MLP, rewritten or not
    own = {f.name: getattr(mlp, f.name) for f in dataclasses.fields(kind)}
    w, b = jnp.asarray(w, mlp.W_in.dtype), jnp.asarray(b, mlp.W_in.dtype)  # f in the model's dtype (--dtype)
    new = _REWRITE_OF[kind](**own, W_f=w, b_f=b, form=form)
    return eqx.tree_at(lambda m: m.blocks[layer].mlp, model, new)


def rewrite(model: Transformer, data: Batch, specs: Sequence[str] | None) -> Transformer:
    """``model`` with each MLP named in ``specs`` rewritten as ``f + rest``, ``f`` fitted on ``data``.

    Every ``f`` is fitted on the original model's activations. No specs: ``model`` unchanged.
    """
    forms = resolve(specs, model.config)
    if not forms:
        return model
    layers = [int(name.split(".")[1]) for name in forms]
    io = _mlp_io(model, _fit_tokens(data), layers)
    for layer, form in zip(layers, forms.values(), strict=True):
        model = _swap(model, layer, *fit_affine(*io[layer], form), form)
    return model


def rewrites_of(model: Transformer) -> dict[str, Rewrite | GatedRewrite]:
    """The rewritten MLPs of ``model``, by name (``blocks.L.mlp``)."""
    kinds = tuple(_REWRITE_OF.values())
    return {f"blocks.{i}.mlp": b.mlp for i, b in enumerate(model.blocks) if isinstance(b.mlp, kinds)}


def tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The fitted parameters to save: ``blocks.L.mlp.W_f`` and ``blocks.L.mlp.b_f``."""
    out = {}
    for name, r in rewrites_of(model).items():
        out[f"{name}.W_f"] = np.asarray(r.W_f, np.float32)
        out[f"{name}.b_f"] = np.asarray(r.b_f, np.float32)
    return out


def from_tensors(
    model: Transformer, specs: Sequence[str] | None, saved: dict[str, np.ndarray], source: str
) -> Transformer:
    """``model`` rewritten with saved parameters (no refit), e.g. when a run folder is reopened."""
    d = model.config.d_model
    for name, form in resolve(specs, model.config).items():
        w, b = saved.get(f"{name}.W_f"), saved.get(f"{name}.b_f")
        if w is None or b is None or w.shape != (d, d) or b.shape != (d,):
            raise ExplainerError(
                f"{source} lacks the fitted rewrite of {name} ([{d}, {d}] W_f and [{d}] b_f); retrain the run"
            )
        model = _swap(model, int(name.split(".")[1]), w, b, form)
    return model


def with_rest_sites(sites: Sequence[str] | None, model: Transformer) -> tuple[str, ...] | None:
    """An explicit site list plus every remainder of ``model`` (``None``, all sites, stays ``None``)."""
    if sites is None:
        return None
    rests = [s for s in model.sites if is_rest(s) and s not in sites]
    return tuple(s for s in model.sites if s in sites or s in rests) + tuple(s for s in sites if s not in model.sites)


SUMMARY_KEYS = ("kl_mean", "kl_p99", "logit_diff_recovered", "accuracy")
REPLACED = {"resample": "resampled", "mean": "mean-ablated", "zero": "zeroed"}


def carried(
    model: Transformer, train: Batch, heldout: Batch, ablation: str = "resample", seed: int = 0
) -> dict[str, Any]:
    """How much of the behaviour each ``f`` carries, on ``heldout`` prompts, against the full model.

    Per rewritten MLP, and for all of them together (``all``): ``f_alone`` is the model with the
    MLP replaced by ``f`` (remainder zeroed); ``remainder_excluded`` replaces the remainder under
    ``ablation`` (resample: the remainder on the counterfactual input), i.e. what an explanation
    that excludes it and keeps everything else would score. Each gives KL (mean, p99), logit
    difference recovered and accuracy. ``r2`` is the share of the MLP output's variance ``f``
    explains on the held-out prompts (every position).
    """
    from explainer.score import evaluate_keep  # the evaluation shared with every run
    from explainer.scrub import Scrubber

    found = rewrites_of(model)
    if not found:
        return {}
    io = _mlp_io(model, heldout.clean, [int(n.split(".")[1]) for n in found])
    groups = {name: [name] for name in found} | ({"all": list(found)} if len(found) > 1 else {})
    report: dict[str, Any] = {}
    for group, names in groups.items():
        rests = [n + ".rest" for n in names]
        keep = {s: jnp.zeros(1) for s in rests}
        entry: dict[str, Any] = {}
        if group in found:
            y, out = io[int(group.split(".")[1])]
            fit = y @ np.asarray(found[group].W_f, np.float64) + np.asarray(found[group].b_f, np.float64)
            total = float(((out - out.mean(0)) ** 2).sum())
            entry = {
                "form": found[group].form,
                "r2": 1.0 - float(((out - fit) ** 2).sum()) / total if total > 0 else 1.0,
            }
        for key, how in (("f_alone", "zero"), ("remainder_excluded", "mean" if ablation == "optimal" else ablation)):
            scores = evaluate_keep(Scrubber.build(model, train, rests, how), heldout, keep, seed)
            entry[key] = {k: scores[k] for k in SUMMARY_KEYS}
        entry["ablation"] = "mean" if ablation == "optimal" else ablation
        report[group] = entry
    return report


def describe(report: dict[str, Any], kept: dict[str, list[int]]) -> list[str]:
    """One line per rewrite for a run's summary: the fit, what ``f`` carries, and the remainder's fate."""
    lines = []
    for name, r in report.items():
        if name == "all":
            continue
        f, ex = r["f_alone"], r["remainder_excluded"]
        fate = "kept" if kept.get(name + ".rest") else "excluded"
        lines.append(
            f"rewrite {name} = {r['form']} (R² {r['r2']:.3f}): f alone recovers logit diff "
            f"{f['logit_diff_recovered']:.3f} (KL {f['kl_mean']:.3g}); remainder {REPLACED[r['ablation']]}: "
            f"{ex['logit_diff_recovered']:.3f} (KL {ex['kl_mean']:.3g}); the explanation {fate} the remainder"
        )
    return lines
