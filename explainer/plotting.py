"""Pictures of explanations: a heatmap of masks (sites × units) and the training curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from explainer.models.config import ModelConfig


def gate_values(expl: Any) -> np.ndarray:
    """Deterministic gate value per site (rows, forward order) and unit (columns), NaN-padded."""
    from explainer.circuit import gate_value

    width = max(expl.n_units.values())
    grid = np.full((len(expl.n_units), width), np.nan)
    for row, (site, n) in enumerate(expl.n_units.items()):
        grid[row, :n] = gate_value(expl.gate_logits[site])
    return grid


def unit_kind(expl: Any) -> str:
    """What a column of the masks picture is: ``writer (edge)``, ``learned direction``, ...

    >>> from explainer.export import example_circuit as example
    >>> unit_kind(example())
    'writer (edge)'
    """
    config = expl.config
    if config.get("units", "dims") == "edges":
        return "writer (edge)"
    basis = str(config.get("basis") or "standard")
    kind = "residual dimension" if basis == "standard" else f"{basis} direction"
    return f"{kind} × position" if config.get("positional") else kind


def finishing_marks(expl: Any) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Units the finishing passes changed: ``(added, dropped)`` per site.

    ``added``: kept although the trained gate is closed (repair, or closing rotated attacks);
    ``dropped``: the gate is open but the unit is not kept (trim). Runs trained to a target size keep
    the top gates instead, so neither is marked there.
    """
    if expl.config.get("target_size") is not None:
        return {}, {}
    added, dropped = {}, {}
    for site in expl.n_units:
        logits = np.asarray(expl.gate_logits[site])
        kept = set(expl.kept.get(site, []))
        added[site] = [u for u in sorted(kept) if logits[u] <= 0.0]
        dropped[site] = [int(u) for u in np.flatnonzero(logits > 0.0) if int(u) not in kept]
    return added, dropped


def plot_explanation(expl: Any, path: str | os.PathLike, truth: dict[str, list[int]] | None = None) -> Path:
    """Write a PNG: the mask heatmap (kept units boxed, ground truth crossed) and training curves.

    Columns are the units of the run's kind (:func:`unit_kind`); sites with fewer units than the
    widest are padded in grey, not drawn as closed gates. Units the finishing passes added back
    (dashed box) or trimmed (slashed) are marked. The curves show the KL against the budget with the
    adversary's gap, and the expected size with the penalty λ, where the history has them.

    >>> import explainer, tempfile
    >>> e = explainer.explain("planted-distractor", steps=300, progress=False)
    >>> plot_explanation(e, tempfile.mkdtemp() + "/masks.png").suffix
    '.png'
    """
    return _save(masks_figure(expl, truth), path)


def masks_figure(expl: Any, truth: dict[str, list[int]] | None = None) -> Figure:
    """The figure :func:`plot_explanation` writes: the heatmap axes first, then the curves."""
    from matplotlib.figure import Figure

    sites = list(expl.n_units)
    grid = gate_values(expl)
    history = expl.history or {}
    curves = bool(history.get("kl"))
    width = min(16.0, max(6.5, 0.35 * grid.shape[1] + 3.5))
    # a bare Figure: no pyplot, so the caller's matplotlib backend and state are left alone
    fig = Figure(figsize=(width, 1.6 + 0.5 * len(sites) + 4.4 * curves))
    ratios = [max(1.0, 0.5 * len(sites))] + [2.0, 1.6] * curves
    axes = fig.subplots(1 + 2 * curves, 1, gridspec_kw={"height_ratios": ratios}, squeeze=False)[:, 0]
    legend = _draw_masks(fig, axes[0], expl, grid, truth)
    f = expl.faithfulness
    axes[0].set_title(
        f"size {expl.size}/{expl.total_units}   KL mean {f['kl_mean']:.3g}   "
        f"logit diff recovered {f['logit_diff_recovered']:.2f}\n{legend}",
        fontsize=9,
    )
    if curves:
        axes[2].sharex(axes[1])
        _draw_curves(axes[1], axes[2], expl)
    fig.tight_layout()
    return fig


def _draw_masks(fig: Figure, ax, expl: Any, grid: np.ndarray, truth: dict | None) -> str:
    """The heatmap of gates with its marks; returns the legend line."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    sites = list(expl.n_units)
    cmap = colormaps["Blues"].with_extremes(bad="0.82")  # padding: grey, never a closed gate
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel(f"unit ({unit_kind(expl)})")
    if grid.shape[1] <= 64:
        ax.set_xticks(range(grid.shape[1]))
    added, dropped = finishing_marks(expl)
    for row, site in enumerate(sites):
        for unit in expl.kept.get(site, []):
            dashed = unit in added.get(site, ())
            ax.add_patch(
                Rectangle(
                    (unit - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5, ls="--" if dashed else "-"
                )
            )
        for unit in dropped.get(site, []):
            ax.plot([unit - 0.4, unit + 0.4], [row + 0.4, row - 0.4], color="tab:orange", lw=2)
        for unit in (truth or {}).get(site, []):
            ax.plot(unit, row, marker="x", color="tab:red", markersize=8, mew=2)
    _name_edges(ax, expl, grid.shape[1])
    fig.colorbar(image, ax=ax, label="gate (noise-free)", fraction=0.03)
    parts = ["boxed: kept"]
    if any(added.values()):
        parts.append("dashed: gate closed, added back by repair")
    if any(dropped.values()):
        trimmed = (expl.history or {}).get("trimmed", [0])[-1]
        parts.append(
            f"orange slash: gate open, dropped by trim ({trimmed:.0f} units)"
            if trimmed
            else "orange slash: gate open, not kept"
        )
    if truth is not None:
        parts.append("x: ground truth")
    if np.isnan(grid).any():
        parts.append("grey: no such unit")
    return "   ".join(parts)


def _name_edges(ax, expl: Any, width: int) -> None:
    """Write each edge unit's writer in its cell (``h1:a0.h0`` for a head's q/k/v), where they fit."""
    if expl.config.get("units", "dims") != "edges" or width > 24:
        return
    from explainer.circuit import model_config
    from explainer.edges import edge_names
    from explainer.errors import ExplainerError

    try:
        names = edge_names(model_config(expl), list(expl.n_units))
    except ExplainerError:  # the model is gone: the picture goes without names
        return
    for row, site in enumerate(expl.n_units):
        for unit, name in enumerate(names[site]):
            writer, reader = name.split("->")
            head = reader.split(".")[1] + ":" if reader.count(".") == 2 else ""
            value = expl.gate_logits[site][unit]
            ax.text(
                unit, row, head + writer, ha="center", va="center", fontsize=6, color="white" if value > 1 else "black"
            )


def _draw_curves(ax, ax_size, expl: Any) -> None:
    """KL (sampled, noise-free), the adversary's gap and the KL budget; expected size and λ."""
    history = expl.history or {}
    kl = np.asarray(history["kl"])
    steps = np.arange(len(kl))
    window = max(1, len(kl) // 50)
    smooth = lambda v: np.convolve(np.asarray(v, float), np.ones(window) / window, mode="same")  # noqa: E731
    ax.plot(steps, smooth(kl), color="tab:blue", lw=1.0, label="KL, sampled gates (running mean)")
    if history.get("kl_deterministic") and any(history["kl_deterministic"]):
        ax.plot(steps, history["kl_deterministic"], color="tab:green", lw=0.8, label="KL, noise-free gates")
    if len(history.get("gap", [])) == len(kl) and any(history["gap"]):
        ax.plot(steps, smooth(history["gap"]), color="tab:red", lw=0.9, label="adversary's gap (running mean)")
    budget = expl.config.get("kl_budget")
    if budget and expl.config.get("target_size") is None and expl.config.get("lam") is None:
        ax.axhline(budget, color="black", ls="--", lw=0.9, label=f"KL budget {budget:g}")
    ax.set_yscale("symlog", linthresh=1e-3)
    finite = kl[np.isfinite(kl)]
    top = max(float(finite.max()) if finite.size else 0.0, budget or 0.0, 1e-3)
    ax.set_ylim(0.0, top * 300)  # a KL is never below 0 (rounding puts a gap at -1e-8); room for the legend
    ax.legend(loc="upper right", ncol=2, fontsize=7, framealpha=0.85)
    ax.set_ylabel("KL (nats)")
    ax.tick_params(labelbottom=False)
    ax_size.plot(steps, history["size"], color="tab:orange", lw=1.2, label="expected size")
    ax_size.set_ylabel("expected size", color="tab:orange")
    ax_size.set_xlabel("step")
    lam = history.get("lambda", [])
    if len(lam) == len(kl) and any(lam):
        twin = ax_size.twinx()
        twin.plot(steps, lam, color="tab:purple", lw=1.0, label="λ (size penalty)")
        if all(np.isfinite(v) and v > 0 for v in lam):
            twin.set_yscale("log")
        twin.set_ylabel("λ (size penalty)", color="tab:purple")


def plot_frontier(
    frontiers: dict[str, dict], path: str | os.PathLike, title: str | None = None, ablations_of: str | None = None
) -> Path:
    """Write a PNG of frontiers: size against normalised faithfulness, the adversarial gap as colour.

    ``frontiers`` maps a label (``"ours"``, a baseline's name) to a frontier dict as returned by
    :func:`explainer.sweep` or :func:`explainer.baselines.baseline_frontier`. A second panel
    shows the frontier ``ablations_of`` (default: the first with ``ablations``) under every ablation.

    >>> import tempfile
    >>> f = {"records": [{"size": 1, "normalized_faithfulness": 0.2, "gap": 0.1, "logit_diff_recovered": 0.3},
    ...                  {"size": 2, "normalized_faithfulness": 1.0, "gap": 0.0, "logit_diff_recovered": 1.0}],
    ...      "cpr": 0.9, "cmd": 0.1, "total_units": 30}
    >>> plot_frontier({"ours": f}, tempfile.mkdtemp() + "/frontier.png").suffix
    '.png'
    """
    return _save(frontier_figure(frontiers, title, ablations_of), path)


def frontier_figure(frontiers: dict[str, dict], title: str | None = None, ablations_of: str | None = None) -> Figure:
    """The figure :func:`plot_frontier` writes: the frontiers, then (optionally) one under each ablation."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

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
        x = [r["size"] for r in records]
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
    drawn = [r for f in frontiers.values() for r in f["records"]]
    _size_axis(ax, [r["size"] for r in drawn], [r["normalized_faithfulness"] for r in drawn])
    ax.set_ylabel("normalised faithfulness (logit difference)")
    ax.legend(loc="best", fontsize=7, framealpha=0.6)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="adversarial gap (KL, nats)", fraction=0.04)
    if with_ablations:
        ax2 = axes[1]
        for name, g in frontiers[with_ablations]["ablations"].items():
            records = sorted(g["records"], key=lambda r: r["size"])
            ax2.plot(
                [r["size"] for r in records],
                [r["normalized_faithfulness"] for r in records],
                marker="o",
                ms=4,
                label=f"{name}  CPR {g['cpr']:.3f}  CMD {g['cmd']:.3f}"
                + (f"  KL area {g['kl_area']:.3g}" if "kl_area" in g else ""),
            )
        ax2.axhline(1.0, color="tab:green", lw=0.8, ls="--")
        drawn = [r for g in frontiers[with_ablations]["ablations"].values() for r in g["records"]]
        _size_axis(ax2, [r["size"] for r in drawn], [r["normalized_faithfulness"] for r in drawn])
        ax2.set_title(f"{with_ablations}: the same explanations under each ablation", fontsize=9)
        ax2.legend(loc="best", fontsize=7, framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_circuit(expl: Any, path: str | os.PathLike, config: ModelConfig | None = None) -> Path:
    """Write a PNG of the circuit: an edge run's kept edges as a layered graph (embed, heads, MLPs,
    logits; q/k/v inputs by colour; width by the gate's probability of being open), or for a
    dimension run the roll-up of kept units per reader. See :mod:`explainer.circuit`.

    ``config`` is the explained model's configuration (default: read from its folder).

    >>> import tempfile
    >>> from explainer.export import example_circuit as example
    >>> plot_circuit(example(), tempfile.mkdtemp() + "/circuit.png").suffix
    '.png'
    """
    from explainer.circuit import circuit_figure, is_edge_run, rollup_figure

    fig = circuit_figure(expl, config)[0] if is_edge_run(expl) else rollup_figure(expl)
    return _save(fig, path)


def _size_axis(ax, sizes: list[int] | None = None, values: list[float] | None = None) -> None:
    """Sizes on a symlog axis: linear from 0 to 1, so size 0 sits at 0, then logarithmic; the sizes
    drawn are the ticks when they are few. The y axis always shows 0 (nothing) to 1 (the full model)."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
    ax.set_xlim(-0.3, max(ax.get_xlim()[1], max(sizes or [1]), 1.0) * 1.3)  # whole markers at both ends
    ticks = sorted(set(sizes or []))
    if 0 < len(ticks) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    finite = [v for v in values or [] if np.isfinite(v)]
    ax.set_ylim(min([0.0, *finite]) - 0.05, max([1.0, *finite]) + 0.05)
    ax.set_xlabel("size (units kept; linear 0-1, log above)")


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG through a temporary file, so a failure never leaves half a picture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
