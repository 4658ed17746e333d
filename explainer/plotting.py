"""Pictures of explanations: a heatmap of masks (sites × units) and the training curves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from explainer.explanation import Explanation
from explainer.masks import GAMMA, ZETA


def gate_values(expl: Explanation) -> np.ndarray:
    """Deterministic gate value per site (rows, forward order) and unit (columns), NaN-padded."""
    width = max(expl.n_units.values())
    grid = np.full((len(expl.n_units), width), np.nan)
    for row, (site, n) in enumerate(expl.n_units.items()):
        logit = np.asarray(expl.gate_logits[site], np.float64)
        sigmoid = 0.5 * (1 + np.tanh(logit / 2))  # the logistic function, without overflow on corrupt logits
        grid[row, :n] = np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0, 1)
    return grid


def plot_explanation(expl: Explanation, path: str | os.PathLike, truth: dict[str, list[int]] | None = None) -> Path:
    """Write a PNG: the mask heatmap (kept units boxed, ground truth crossed) and training curves.

    >>> import explainer, tempfile
    >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
    >>> plot_explanation(e, tempfile.mkdtemp() + "/masks.png").suffix
    '.png'
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    sites = list(expl.n_units)
    grid = gate_values(expl)
    curves = bool(expl.history and expl.history.get("kl"))
    # a bare Figure: no pyplot, so the caller's matplotlib backend and state are left alone
    fig = Figure(figsize=(max(6.0, 0.35 * grid.shape[1] + 3), 1.2 + 0.5 * len(sites) + 2.6 * curves))
    axes = fig.subplots(
        1 + curves, 1, gridspec_kw={"height_ratios": [max(1.0, 0.5 * len(sites))] + [2.2] * curves}, squeeze=False
    )
    ax = axes[0, 0]
    image = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("unit (residual dimension)")
    if grid.shape[1] <= 64:
        ax.set_xticks(range(grid.shape[1]))
    for row, site in enumerate(sites):
        for unit in expl.kept.get(site, []):
            ax.add_patch(Rectangle((unit - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))
        for unit in (truth or {}).get(site, []):
            ax.plot(unit, row, marker="x", color="tab:red", markersize=8, mew=2)
    fig.colorbar(image, ax=ax, label="gate", fraction=0.03)
    f = expl.faithfulness
    legend = "boxed: kept" + ("   x: ground truth" if truth is not None else "")
    ax.set_title(
        f"size {expl.size}/{expl.total_units}   KL mean {f['kl_mean']:.3g}   "
        f"logit diff recovered {f['logit_diff_recovered']:.2f}\n{legend}",
        fontsize=9,
    )
    if curves:
        assert expl.history is not None
        ax2 = axes[1, 0]
        steps = np.arange(len(expl.history["kl"]))
        kl = np.asarray(expl.history["kl"])
        window = max(1, len(kl) // 50)
        smooth = np.convolve(kl, np.ones(window) / window, mode="same")
        ax2.plot(steps, smooth, color="tab:blue", lw=1.0, label="KL, sampled gates (running mean)")
        if expl.history.get("kl_deterministic") and any(expl.history["kl_deterministic"]):
            ax2.plot(steps, expl.history["kl_deterministic"], color="tab:green", lw=0.8, label="KL, noise-free gates")
        ax2.legend(loc="upper right", fontsize=7)
        ax2.set_yscale("symlog", linthresh=1e-3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("KL (nats)", color="tab:blue")
        twin = ax2.twinx()
        twin.plot(steps, expl.history["size"], color="tab:orange", lw=1.2, label="expected size")
        twin.set_ylabel("expected size", color="tab:orange")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def plot_frontier(
    frontiers: dict[str, dict], path: str | os.PathLike, title: str | None = None, ablations_of: str | None = None
) -> Path:
    """Write a PNG of frontiers: size against normalised faithfulness, the adversarial gap as colour.

    ``frontiers`` maps a label (``"ours"``, a baseline's name) to a frontier dict as returned by
    :func:`explainer.sweep.sweep` or :func:`explainer.baselines.baseline_frontier`. A second panel
    shows the frontier ``ablations_of`` (default: the first with ``ablations``) under every ablation.

    >>> import tempfile
    >>> f = {"records": [{"size": 1, "normalized_faithfulness": 0.2, "gap": 0.1, "logit_diff_recovered": 0.3},
    ...                  {"size": 2, "normalized_faithfulness": 1.0, "gap": 0.0, "logit_diff_recovered": 1.0}],
    ...      "cpr": 0.9, "cmd": 0.1, "total_units": 30}
    >>> plot_frontier({"ours": f}, tempfile.mkdtemp() + "/frontier.png").suffix
    '.png'
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    with_ablations = ablations_of or next((k for k, f in frontiers.items() if f.get("ablations")), None)
    fig = Figure(figsize=(11.0 if with_ablations else 6.5, 4.2))
    axes = fig.subplots(1, 2 if with_ablations else 1, squeeze=False)[0]
    ax = axes[0]
    gaps = [r.get("gap", 0.0) or 0.0 for f in frontiers.values() for r in f["records"]]
    norm = Normalize(vmin=0.0, vmax=max(1e-3, max(gaps, default=0.0)))
    markers = "osD^vP*Xh"
    scatter = None
    for i, (label, f) in enumerate(frontiers.items()):
        records = sorted(f["records"], key=lambda r: r["size"])
        x = [max(r["size"], 0.5) for r in records]  # size 0 drawn at 0.5 on the log axis
        y = [r["normalized_faithfulness"] for r in records]
        ax.plot(x, y, color="0.6", lw=1.0, zorder=1)
        scatter = ax.scatter(
            x,
            y,
            c=[r.get("gap", 0.0) or 0.0 for r in records],
            cmap="magma_r",
            norm=norm,
            marker=markers[i % len(markers)],
            edgecolors="black",
            s=45,
            zorder=2,
            label=f"{label}  CPR {f.get('cpr', float('nan')):.3f}  CMD {f.get('cmd', float('nan')):.3f}"
            + (f"  KL area {f['kl_area']:.3g}" if "kl_area" in f else ""),
        )
    ax.axhline(1.0, color="tab:green", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("size (units kept, log scale)")
    ax.set_ylabel("normalised faithfulness (logit difference)")
    ax.legend(loc="lower right", fontsize=7)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="adversarial gap (KL, nats)", fraction=0.04)
    if with_ablations:
        ax2 = axes[1]
        for name, g in frontiers[with_ablations]["ablations"].items():
            records = sorted(g["records"], key=lambda r: r["size"])
            ax2.plot(
                [max(r["size"], 0.5) for r in records],
                [r["normalized_faithfulness"] for r in records],
                marker="o",
                ms=4,
                label=f"{name}  CPR {g['cpr']:.3f}  CMD {g['cmd']:.3f}"
                + (f"  KL area {g['kl_area']:.3g}" if "kl_area" in g else ""),
            )
        ax2.axhline(1.0, color="tab:green", lw=0.8, ls="--")
        ax2.set_xscale("log")
        ax2.xaxis.set_major_formatter(ScalarFormatter())
        ax2.set_xlabel("size (units kept, log scale)")
        ax2.set_title(f"{with_ablations}: the same explanations under each ablation", fontsize=9)
        ax2.legend(loc="lower right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
