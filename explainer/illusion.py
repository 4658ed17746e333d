"""The subspace-patching illusion check (Makelov et al., 2023).

A kept unit is a direction ``b`` of its site's residual. Two questions tell a real finding from an
illusion:

- **used share**: how much of ``b`` lies in the reader's input space, i.e. the row space of the
  weights that read the site (attention ``W_Q/W_K/W_V``, MLP ``W_in`` or the unembedding, after
  LayerNorm's centring and scale). The rest lies in their null space and cannot change anything.
- **dormant**: whether the part of ``b`` the reader does use actually varies on the task. The
  illusion pairs a *disconnected* direction (varies on the task, read by nobody) with a *dormant*
  one (read, but constant on the task): patching along their sum moves the dormant direction,
  which the full model never does on the task, and shows an effect the model does not have.

A unit is flagged when less than ``1 − USED_TOLERANCE`` of it is used *and* the used part is
dormant: its variance on the task is below ``DORMANT_SHARE`` of the unit's own variance. In the
standard basis of a model whose readers have full rank nothing is ever flagged.
"""

from __future__ import annotations

import numpy as np

from explainer.models.native import to_state_dict
from explainer.models.transformer import Transformer
from explainer.tasks.base import Batch

USED_TOLERANCE = 0.05
DORMANT_SHARE = 0.01
RANK_TOLERANCE = 1e-6


def reader_space(model: Transformer, site: str) -> np.ndarray:
    """Orthonormal columns spanning the directions of ``site`` its reader responds to."""
    w = {k: np.asarray(v, np.float64) for k, v in to_state_dict(model).items()}
    d = model.config.d_model
    if site == "unembed.in":
        weights, ln = w["unembed.W_U"], "ln_final"
    elif site.endswith("mlp.in"):
        prefix = site.removesuffix(".in")
        weights, ln = w[prefix + ".W_in"], prefix.removesuffix(".mlp") + ".ln2"
    else:
        prefix = site.removesuffix(".in")
        heads = [np.moveaxis(w[f"{prefix}.W_{x}"], 1, 0).reshape(d, -1) for x in "QKV"]
        weights, ln = np.concatenate(heads, axis=1), prefix.removesuffix(".attn") + ".ln1"
    if model.config.normalization_type in ("LN", "LNPre"):
        weights = weights * w.get(ln + ".w", np.ones(d))[:, None]  # LN's scale, then its centring
        weights = (np.eye(d) - np.full((d, d), 1.0 / d)) @ weights
    u, s, _ = np.linalg.svd(weights, full_matrices=False)
    return u[:, s > RANK_TOLERANCE * max(s.max(initial=0.0), 1e-30)]


def check_illusions(
    model: Transformer,
    data: Batch,
    kept: dict[str, list[int]],
    bases: dict[str, np.ndarray] | None = None,
    positional: bool = False,
    max_prompts: int = 512,
) -> dict[str, dict]:
    """Per site with kept units: each unit's used share, and the units flagged as illusions.

    ``bases`` holds the run's basis matrices (columns = units; absent sites: standard). Returns
    ``{site: {"used_share": [...], "mean_used_share", "flagged": [units]}}``.
    """
    d = model.config.d_model
    rest = ".mlp.rest"  # a rewrite's remainder is not a residual direction
    sites = tuple(site for site, units in kept.items() if units and not site.endswith(rest))
    _, cache = model.run(data.clean[:max_prompts], capture=sites)
    out = {}
    for site in sites:
        h = np.asarray(cache[site], np.float64).reshape(-1, d)
        h = h - h.mean(0)
        space = reader_space(model, site)
        basis = np.asarray((bases or {}).get(site, np.eye(d)), np.float64)
        shares, flagged = [], []
        for unit in kept[site]:
            b = basis[:, unit % d if positional else unit]
            used = space @ (space.T @ b)
            share = float(used @ used)
            shares.append(share)
            if share < 1.0 - USED_TOLERANCE:
                own = float(np.var(h @ b))
                along_used = float(np.var(h @ (used / np.sqrt(share)))) * share if share > 0 else 0.0
                if own > 0 and along_used < DORMANT_SHARE * own:
                    flagged.append(unit)
        out[site] = {"used_share": shares, "mean_used_share": float(np.mean(shares)), "flagged": flagged}
    return out
