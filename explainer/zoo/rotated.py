"""Planted models in disguise: a residual stream rotated so that no dimension means anything.

Without LayerNorm, a transformer is unchanged by any rotation ``R`` of its residual stream when
every writer's output is multiplied by ``R`` and every reader's input weights by ``Rᵀ``: the
rotated model computes exactly the same logits, but a feature that lived in one dimension now
lives in a dense direction. A planted model rotated this way keeps its ground truth *rank* per
site (one direction where the original kept one dimension), while in the standard basis its
explanation needs many dimensions. Bases (:mod:`explainer.bases`) are tested on it.

>>> from explainer.models import load_model
>>> from explainer.zoo import resolve_model
>>> import jax.numpy as jnp
>>> net = load_model(resolve_model("planted-distractor"))
>>> turned, r = rotate(net, seed=0)
>>> tokens = jnp.array([[0, 1, 2, 3]])
>>> bool(jnp.allclose(net(tokens), turned(tokens), atol=1e-5))
True
"""

from __future__ import annotations

import numpy as np

from explainer.errors import ExplainerError
from explainer.models.native import from_state_dict, to_state_dict
from explainer.models.transformer import Transformer

# tensors whose last axis is written into the residual stream, and readers' input axes
WRITERS = ("embed.W_E", "pos_embed.W_pos", "attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")
READERS = {"attn.W_Q": -2, "attn.W_K": -2, "attn.W_V": -2, "mlp.W_in": 0, "unembed.W_U": 0}


def random_rotation(d: int, seed: int) -> np.ndarray:
    """A random orthogonal matrix (Haar measure, via QR with the sign fix)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float64)


def rotate(model: Transformer, seed: int = 0, rotation: np.ndarray | None = None) -> tuple[Transformer, np.ndarray]:
    """``model`` with its residual stream rotated by ``rotation`` (random from ``seed`` if not given).

    Returns the rotated model and ``R``: the new residual is ``h R``, so the original dimension
    ``i`` is the direction ``R[i]`` (row ``i``) of the new one.
    """
    cfg = model.config
    if cfg.normalization_type is not None:
        raise ExplainerError(
            "only models without LayerNorm can be rotated exactly (LayerNorm is not rotation-invariant)"
        )
    r = random_rotation(cfg.d_model, seed) if rotation is None else np.asarray(rotation, np.float64)
    out = {}
    for name, w in to_state_dict(model).items():
        w = np.asarray(w, np.float64)
        if name.endswith(WRITERS):
            w = w @ r
        for suffix, axis in READERS.items():
            if name.endswith(suffix):
                w = np.moveaxis(np.tensordot(r.T, np.moveaxis(w, axis, 0), axes=(1, 0)), 0, axis)
        out[name] = w.astype(np.float32)
    return from_state_dict(cfg, out, source="rotated weights"), r


def write_rotated(name: str, folder, seed: int = 0) -> np.ndarray:
    """Write zoo model ``name`` rotated (see :func:`rotate`) as a model folder with the same prompts;
    ``truth_rank.json`` holds the number of directions per site its explanation needs. Returns ``R``."""
    import shutil
    from pathlib import Path

    from explainer.models import load_model
    from explainer.models.native import save_model, write_json
    from explainer.zoo import load_truth, resolve_model

    source = resolve_model(name)
    turned, r = rotate(load_model(source), seed)
    folder = Path(folder)
    save_model(turned, folder)
    shutil.copyfile(source / "prompts.json", folder / "prompts.json")
    truth = load_truth(source) or {}
    write_json(folder / "truth_rank.json", truth_ranks(load_model(source), truth))
    return r


def truth_ranks(model: Transformer, truth: dict[str, list[int]]) -> dict[str, int]:
    """Per site, the rank of what the reader reads from the truth's dimensions: the number of
    directions an explanation in the best basis needs (at most the number of dimensions)."""
    weights = to_state_dict(model)
    out = {}
    for site, units in truth.items():
        if not units:
            continue
        if site == "unembed.in":
            rows = weights["unembed.W_U"][units]
        elif site.endswith("mlp.in"):
            rows = weights[site.removesuffix(".in") + ".W_in"][units]
        else:
            prefix = site.removesuffix(".in")
            rows = np.concatenate(
                [np.moveaxis(weights[f"{prefix}.W_{x}"], 1, 0)[units].reshape(len(units), -1) for x in "QKV"], axis=1
            )
        out[site] = int(np.linalg.matrix_rank(np.asarray(rows, np.float64), tol=1e-6))
    return out
