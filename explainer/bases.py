"""Bases: which coordinates of a site's residual count as its units.

Residual-stream dimensions have no privileged basis, so an explanation's size depends on the basis
it is counted in. Per run, every masked site uses one of:

- ``standard`` (default): units are residual dimensions;
- ``pca``: fixed, the principal directions of the site's residual on the task's training prompts
  (every position), largest variance first;
- ``gradient``: fixed, the eigenvectors of ``E[g gᵀ]`` with ``g`` the gradient of the full model's
  logit difference with respect to the site's residual (every position of the training prompts),
  largest first: the directions the task's answer is sensitive to, and nothing else;
- ``learned``: an orthogonal rotation trained with the mask (as in Distributed Alignment Search),
  parameterised as ``start · expm(A − Aᵀ)`` so that it stays orthogonal. It starts at the
  ``gradient`` basis: from the identity, a rotation and a mask trained together settle in a
  local optimum that keeps several times more directions than needed;
- a file: a user's orthogonal matrix per site (``.safetensors`` or ``.npz`` with one
  ``[d_model, d_model]`` array per site name; columns are the units).

The finished basis is saved with the run (``basis.<site>`` tensors), so every command that reads
the run rebuilds the same scrubbed model.

>>> import numpy as np
>>> from explainer.masks import LearnedBasis
>>> b = LearnedBasis.init(np.eye(3, dtype=np.float32))
>>> bool(np.allclose(np.asarray(b.matrix), np.eye(3)))
True
"""

from __future__ import annotations

import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from explainer.errors import ExplainerError, did_you_mean
from explainer.masks import Basis, LearnedBasis, OrthogonalBasis
from explainer.models.transformer import Transformer
from explainer.tasks.base import Batch

BASES = ("standard", "pca", "gradient", "learned")
ORTHOGONALITY_TOLERANCE = 1e-4
GRADIENT_RANK_TOLERANCE = 1e-6  # eigenvalues below this share of the largest count as zero


def check_basis(basis: str) -> str:
    """A basis name, or a path to a file of matrices (checked when loaded)."""
    if basis in BASES or basis.endswith((".safetensors", ".npz")):
        return basis
    raise ExplainerError(
        f"unknown basis {basis!r}; {did_you_mean(basis, BASES)} (or give a .safetensors / .npz file of matrices)"
    )


def pca_bases(model: Transformer, data: Batch, sites, max_prompts: int = 1024) -> dict[str, OrthogonalBasis]:
    """Principal directions of each site's residual on ``data`` (all positions), by variance."""
    tokens = data.clean[: min(len(data), max_prompts)]
    _, cache = model.run(tokens, capture=tuple(sites))
    out = {}
    for site in sites:
        x = np.asarray(cache[site], np.float64).reshape(-1, cache[site].shape[-1])
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=True)
        out[site] = OrthogonalBasis(jnp.asarray(vt.T, jnp.float32))
    return out


def gradient_bases(
    model: Transformer, data: Batch, sites, max_prompts: int = 512, chunk: int = 128
) -> dict[str, OrthogonalBasis]:
    """Eigenvectors of the second moment of the logit difference's gradient at each site."""
    from explainer.metrics import logit_diff
    from explainer.scrub import last

    n = min(len(data), max_prompts)
    d = model.config.d_model

    @eqx.filter_jit
    def moment(model, part: Batch, site: str):
        _, cache = model.run(part.clean, capture=(site,))

        def metric(h):
            logits = model(part.clean, edit=lambda s, x: h if s == site else x)
            return logit_diff(last(logits), part.answers, part.wrong_answers).sum()

        g = jax.grad(metric)(cache[site]).reshape(-1, d)
        return g.T @ g

    clean = data.clean[:n]
    other = data.corrupt[:n] if data.corrupt is not None else jnp.roll(clean, 1, axis=0)
    _, h = model.run(clean, capture=tuple(sites))
    _, r = model.run(other, capture=tuple(sites))
    if data.corrupt is not None:  # the counterfactual's values at the positions that stand for clean's
        r = data.take(jnp.arange(n)).at_clean_positions(r)

    def differences(site: str) -> np.ndarray:
        return np.asarray(h[site] - r[site], np.float64).reshape(-1, d)

    out = {}
    for site in sites:
        total = np.zeros((d, d))
        for start in range(0, n, chunk):
            part = data.take(jnp.arange(start, min(start + chunk, n)))
            total += np.asarray(moment(model, part, site), np.float64)
        values, vectors = np.linalg.eigh(total)
        values, vectors = values[::-1], vectors[:, ::-1]
        rank = int((values > GRADIENT_RANK_TOLERANCE * max(values[0], 1e-30)).sum())
        out[site] = OrthogonalBasis(jnp.asarray(_complete(vectors[:, :rank], differences(site)), jnp.float32))
    return out


def _complete(top: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``top``'s columns, then the principal directions of ``x`` (rows) in their orthogonal
    complement, by variance: directions along which clean and replacement never differ come
    last, so a mask can drop them without also dropping part of a direction that varies."""
    d = top.shape[0]
    rest = np.eye(d) - top @ top.T
    _, _, vt = np.linalg.svd(x @ rest, full_matrices=True)
    tail = rest @ vt.T
    q, _ = np.linalg.qr(np.concatenate([top, tail], axis=1))
    q = q[:, :d]
    return (q * np.sign(np.sum(q * np.concatenate([top, tail], axis=1)[:, :d], axis=0) + 1e-30)).astype(np.float32)


def file_bases(path: str | os.PathLike, sites, d_model: int) -> dict[str, OrthogonalBasis]:
    """Orthogonal matrices per site from a file; sites the file leaves out keep the standard basis."""
    path = Path(path)
    if not path.is_file():
        raise ExplainerError(f"basis file {str(path)!r} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: np.asarray(f[k]) for k in f.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ExplainerError(f"cannot read basis file {str(path)!r}: {err}") from None
    unknown = [k for k in arrays if k not in sites]
    if unknown:
        raise ExplainerError(f"basis file {str(path)!r} names unknown sites {unknown}; valid: {', '.join(sites)}")
    out = {}
    for site, m in arrays.items():
        if m.shape != (d_model, d_model):
            raise ExplainerError(f"basis for {site!r} has shape {m.shape}; it must be [{d_model}, {d_model}]")
        m = m.astype(np.float64)
        error = float(np.abs(m.T @ m - np.eye(d_model)).max()) if np.isfinite(m).all() else float("inf")
        if error > ORTHOGONALITY_TOLERANCE:
            raise ExplainerError(
                f"basis for {site!r} is not orthogonal (max |BᵀB − I| = {error:.2g}); "
                "give orthonormal columns, e.g. the Q of a QR decomposition"
            )
        out[site] = OrthogonalBasis(jnp.asarray(m, jnp.float32))
    return out


def build_bases(basis: str, model: Transformer, data: Batch, sites) -> dict[str, Basis]:
    """The bases of a run, for its scrubber (:class:`explainer.scrub.Scrubber`), which owns them:
    ``learned`` ones are :class:`LearnedBasis` rotations starting at the ``gradient`` basis, and
    training moves them in the scrubber (:func:`explainer.train.step.train_gates`).

    A rewrite's remainder (``.mlp.rest``) is one unit and has no basis."""
    check_basis(basis)
    sites = [s for s in sites if not s.endswith(".mlp.rest")]
    if basis == "standard":
        return {}
    if basis == "pca":
        return dict(pca_bases(model, data, sites))
    if basis == "gradient":
        return dict(gradient_bases(model, data, sites))
    if basis == "learned":
        return dict(learned_bases(gradient_bases(model, data, sites), sites, model.config.d_model))
    return dict(file_bases(basis, sites, model.config.d_model))


def learned_bases(start: dict[str, Basis], sites, d_model: int) -> dict[str, LearnedBasis]:
    """Trainable rotations, one per site, starting at ``start``'s matrices (identity if absent)."""
    eye = np.eye(d_model, dtype=np.float32)
    sites = [s for s in sites if not s.endswith(".mlp.rest")]  # one unit: nothing to rotate
    return {site: LearnedBasis.init(getattr(start.get(site), "matrix", eye)) for site in sites}


def matrices(bases: dict[str, Basis]) -> dict[str, np.ndarray]:
    """The finished matrices (columns = units) of the non-standard bases, for saving."""
    return {site: np.asarray(b.matrix, np.float32) for site, b in bases.items() if hasattr(b, "matrix")}
