"""The circuit picture: an edge run's kept edges as a layered graph, or a dimension run's roll-up.

Nodes are the writers and readers of :mod:`explainer.edges`: ``embed``, every head ``a{l}.h{h}``,
every MLP ``m{l}`` and ``logits``, in columns from left (embed) to right (logits). An edge runs
from its writer to its reader; into a head it enters at the head's query, key or value port, in
the colour of that input. Its width is the trained gate's probability of being open
(:meth:`explainer.masks.Gates.keep_probability`, read from the saved gate logits), so edges the
training was sure of are thick; an edge the finishing passes added back although its gate was
closed (repair) is dashed.

A dimension run has no writer -> reader graph, so its picture is a roll-up: how many units each
reader keeps, per site.

:func:`explainer.plotting.plot_circuit` writes either picture to a PNG.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from explainer.errors import ExplainerError
from explainer.masks import BETA, GAMMA, ZETA

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from explainer.models.config import ModelConfig

PORT_COLOURS = {"q": "tab:blue", "k": "tab:red", "v": "tab:green", "attn": "tab:purple"}
OTHER_COLOUR = "0.25"  # edges into an MLP or the logits


@dataclasses.dataclass(frozen=True)
class CircuitEdge:
    """One kept edge: ``name`` as :func:`explainer.edges.edge_names` gives it, its ends and weight.

    ``reader`` is the node it enters (``a1.h1``, ``a1`` for a whole attention layer, ``m0``,
    ``logits``) and ``port`` the input it feeds (``q``, ``k``, ``v``, ``attn``, ``mlp``,
    ``logits``). ``gate`` is the trained gate's noise-free value, ``probability`` its chance of
    being open; ``added`` marks an edge kept although its gate was closed.
    """

    name: str
    writer: str
    reader: str
    port: str
    site: str
    unit: int
    gate: float
    probability: float
    added: bool


def gate_value(logits: np.ndarray) -> np.ndarray:
    """The hard-concrete gate's noise-free value in [0, 1], as :meth:`Gates.deterministic`."""
    sigmoid = 0.5 * (1 + np.tanh(np.asarray(logits, np.float64) / 2))  # logistic, no overflow
    return np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def open_probability(logits: np.ndarray) -> np.ndarray:
    """P(gate > 0) per unit, as :meth:`Gates.keep_probability`."""
    shifted = np.asarray(logits, np.float64) - BETA * math.log(-GAMMA / ZETA)
    return 0.5 * (1 + np.tanh(shifted / 2))


def model_config(expl: Any) -> ModelConfig:
    """The configuration of the model ``expl`` explains, read from its folder (weights not needed)."""
    from pathlib import Path

    from explainer.models.config import ModelConfig
    from explainer.models.native import CONFIG_FILE, read_json
    from explainer.zoo import resolve_model

    name, path = expl.model.get("name"), expl.model.get("path")
    folder = resolve_model(name) if name else Path(str(path))
    if not (folder / CONFIG_FILE).is_file():
        raise ExplainerError(f"the model of this run is gone: {str(folder / CONFIG_FILE)!r} does not exist")
    return ModelConfig.from_json(read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))


def is_edge_run(expl: Any) -> bool:
    return expl.config.get("units", "dims") == "edges"


def circuit_edges(expl: Any, config: ModelConfig | None = None) -> list[CircuitEdge]:
    """The kept edges of an edge run, strongest first within each reader, in forward order of readers.

    >>> from explainer.export import example_circuit
    >>> for edge in circuit_edges(example_circuit()):
    ...     print(edge.name, edge.reader, edge.port, round(edge.probability, 2))
    embed->a0.h0.v a0.h0 v 0.97
    a0.h0->a1.h1.k a1.h1 k 0.89
    embed->a1.h1.v a1.h1 v 0.97
    a1.h1->logits logits logits 0.97
    """
    from explainer.edges import edge_names

    if not is_edge_run(expl):
        raise ExplainerError(
            "this explanation keeps residual dimensions, not edges; its circuit graph is the roll-up "
            "(plot_circuit draws it), or train with --units edges for a graph of writer -> reader edges"
        )
    config = config or model_config(expl)
    names = edge_names(config, list(expl.n_units))
    out = []
    for site, units in expl.kept.items():
        logits = np.asarray(expl.gate_logits[site], np.float64)
        gates, probs = gate_value(logits), open_probability(logits)
        for unit in sorted(units, key=lambda u: -probs[u]):
            writer, reader = names[site][unit].split("->")
            node, port = _reader_node(reader)
            out.append(
                CircuitEdge(
                    name=names[site][unit],
                    writer=writer,
                    reader=node,
                    port=port,
                    site=site,
                    unit=int(unit),
                    gate=float(gates[unit]),
                    probability=float(probs[unit]),
                    added=bool(logits[unit] <= 0.0) and expl.config.get("target_size") is None,
                )
            )
    return out


def _reader_node(reader: str) -> tuple[str, str]:
    """``a1.h1.k`` -> (``a1.h1``, ``k``); ``a1`` -> (``a1``, ``attn``); ``m0``; ``logits``."""
    if reader == "logits":
        return reader, "logits"
    if reader.startswith("m"):
        return reader, "mlp"
    if reader.count(".") == 2:
        head, port = reader.rsplit(".", 1)
        return head, port
    return reader, "attn"


def _layout(config: ModelConfig) -> tuple[dict[str, tuple[float, float]], dict[int, float]]:
    """Node centres ``(x, y)``: one column per embed, attention layer, MLP and logits; heads stacked."""
    heads = config.n_heads
    centre = (heads - 1) / 2
    pos = {"embed": (0.0, centre)}
    attn_x: dict[int, float] = {}
    x = 0.0
    for layer in range(config.n_layers):
        x += 1.0
        attn_x[layer] = x
        for h in range(heads):
            pos[f"a{layer}.h{h}"] = (x, float(heads - 1 - h))
        if not config.attn_only:
            x += 1.0
            pos[f"m{layer}"] = (x, centre)
    pos["logits"] = (x + 1.0, centre)
    return pos, attn_x


BOX_W, BOX_H = 0.42, 0.5  # node size in data units (columns 1 apart, heads 1 apart)
_PORT_DY = {"q": 0.15, "k": 0.0, "v": -0.15}


def circuit_figure(expl: Any, config: ModelConfig | None = None) -> tuple[Figure, list[CircuitEdge]]:
    """The figure of an edge run's circuit and the edges it draws (each arrow's gid is ``edge:{name}``)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    config = config or model_config(expl)
    edges = circuit_edges(expl, config)
    pos, attn_x = _layout(config)
    columns = 1 + max(x for x, _ in pos.values())
    fig = Figure(figsize=(max(6.5, 1.9 * columns + 1.5), max(3.6, 0.9 * config.n_heads + 2.2)))
    ax = fig.subplots()
    used = (
        {e.writer for e in edges}
        | {e.reader for e in edges}
        | {h for e in edges for h in _heads_of(e.reader, e.port, config)}
    )
    for layer, x in attn_x.items():  # the layer's attention, behind its heads
        whole = f"a{layer}" in used
        ax.add_patch(
            Rectangle(
                (x - BOX_W / 2 - 0.1, -0.5),
                BOX_W + 0.2,
                config.n_heads,
                facecolor="#f3eefa" if whole else "none",
                edgecolor=PORT_COLOURS["attn"] if whole else "0.85",
                lw=0.8,
                ls="-" if whole else ":",
                zorder=0,
            )
        )
        ax.text(x, config.n_heads - 0.42, f"layer {layer} attention", ha="center", va="bottom", fontsize=7, color="0.4")
    for node, (x, y) in pos.items():
        fill = "#dbe9f6" if node.startswith("a") else "#fde0c5" if node.startswith("m") else "#e8e8e8"
        on = node in used
        ax.add_patch(
            FancyBboxPatch(
                (x - BOX_W / 2, y - BOX_H / 2),
                BOX_W,
                BOX_H,
                boxstyle="round,pad=0.02",
                facecolor=fill if on else "white",
                edgecolor="black" if on else "0.75",
                lw=1.0,
                zorder=3,
            )
        )
        ax.text(x, y, node, ha="center", va="center", fontsize=8, color="black" if on else "0.6", zorder=4)
    widest = max((e.probability for e in edges), default=1.0)
    for e in edges:
        x0, y0 = pos[e.writer]
        if e.port == "attn":  # a mask shared by the layer's heads: into the layer's box
            x1, y1 = attn_x[int(e.reader[1:])] - 0.1, (config.n_heads - 1) / 2
        else:
            x1, y1 = _entry(e.reader, config, pos)
        start = (x0 + BOX_W / 2, y0)
        end = (x1 - BOX_W / 2, y1 + _PORT_DY.get(e.port, 0.0))
        rad = _bend(x0, y0, x1, y1, (config.n_heads - 1) / 2)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=9,
                color=PORT_COLOURS.get(e.port, OTHER_COLOUR),
                lw=0.7 + 3.3 * e.probability / max(widest, 1e-9),
                ls="--" if e.added else "-",
                alpha=0.8,
                zorder=2.2 if e.port in ("q", "k") else 2,  # the fewer q/k edges above the many v edges
                gid=f"edge:{e.name}",
                shrinkA=1,
                shrinkB=1,
            )
        )
    for reader, port in dict.fromkeys((e.reader, e.port) for e in edges if e.port in _PORT_DY):
        x, y = _entry(reader, config, pos)  # the port's letter where an edge enters a head
        ax.text(x - BOX_W / 2 + 0.05, y + _PORT_DY[port], port, fontsize=6, va="center", zorder=5)
    ax.set_xlim(-0.5, columns - 0.5)
    ax.set_ylim(-0.7, config.n_heads + 0.1)
    ax.set_axis_off()
    handles = [Line2D([], [], color=PORT_COLOURS[p], lw=2, label=f"into a head's {p}") for p in "qkv"]
    if any(e.port == "attn" for e in edges):
        handles.append(Line2D([], [], color=PORT_COLOURS["attn"], lw=2, label="into a whole attention layer"))
    handles.append(Line2D([], [], color=OTHER_COLOUR, lw=2, label="into an MLP or the logits"))
    if any(e.added for e in edges):
        handles.append(Line2D([], [], color="0.4", lw=1, ls="--", label="gate closed, added back by repair"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=7, frameon=False)
    f = expl.faithfulness
    ax.set_title(
        f"{_who(expl)}: {len(edges)} of {expl.total_units} edges kept   KL mean {f['kl_mean']:.3g}   "
        f"logit diff recovered {f['logit_diff_recovered']:.2f}\nline width: probability the trained gate is open",
        fontsize=9,
    )
    fig.tight_layout()
    return fig, edges


def _heads_of(reader: str, port: str, config: ModelConfig) -> list[str]:
    """The nodes an edge into ``reader`` feeds: the reader, or every query head that reads it (a
    whole attention layer's heads; under grouped-query attention, those sharing ``a{l}.kv{g}``)."""
    layer, _, rest = reader[1:].partition(".")
    if port == "attn":
        return [f"a{layer}.h{h}" for h in range(config.n_heads)]
    if rest.startswith("kv"):
        group = config.n_heads // config.n_kv_heads
        return [f"a{layer}.h{h}" for h in range(int(rest[2:]) * group, (int(rest[2:]) + 1) * group)]
    return [reader]


def _entry(reader: str, config: ModelConfig, pos: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Where an edge into ``reader`` ends: its node, or the middle of the query heads that share
    key-value head ``a{l}.kv{g}``."""
    if reader in pos:
        return pos[reader]
    heads = _heads_of(reader, "k", config)
    return pos[heads[0]][0], float(np.mean([pos[h][1] for h in heads]))


def _bend(x0: float, y0: float, x1: float, y1: float, centre: float) -> float:
    """The arc of an edge: straight between neighbouring columns, else bowed away from the middle
    row (where embed, the MLPs and the logits sit) far enough to pass the boxes in between."""
    if x1 - x0 <= 1.01:
        return 0.0
    mid = (y0 + y1) / 2
    side = 1.0 if mid < centre - 0.01 else -1.0 if mid > centre + 0.01 else (1.0 if int(x0 + x1) % 2 else -1.0)
    # arc3's control point sits rad * length off the chord, left of the direction of travel
    return side * min(0.45, 0.3 + 0.05 * (x1 - x0))


def _who(expl: Any) -> str:
    return f"{expl.model.get('name') or expl.model.get('path')} on {expl.task.get('name')}"


def rollup_figure(expl: Any) -> Figure:
    """A dimension run's roll-up: per reader, kept units against all its units."""
    from matplotlib.figure import Figure

    sites = list(expl.n_units)
    kept = [len(expl.kept.get(s, [])) for s in sites]
    total = [expl.n_units[s] for s in sites]
    fig = Figure(figsize=(8.0, 1.5 + 0.42 * len(sites)))
    ax = fig.subplots()
    rows = np.arange(len(sites))[::-1]  # forward order, top to bottom
    ax.barh(rows, total, color="0.93", edgecolor="0.75", label="all units of the reader's input")
    colours = ["#fdae6b" if ".mlp." in s else "0.55" if s.startswith("unembed") else "#6baed6" for s in sites]
    ax.barh(rows, kept, color=colours, edgecolor="black", label="kept")
    for r, k, n in zip(rows, kept, total, strict=True):
        ax.text(n, r, f" {k}/{n}", va="center", fontsize=8)
    ax.set_yticks(rows, [_reader_label(s) for s in sites], fontsize=8)
    ax.set_xlim(0, max(total) * 1.15)
    kind = "learned directions" if expl.config.get("basis", "standard") != "standard" else "residual dimensions"
    ax.set_xlabel(f"{kind} kept (coloured) of all (grey)")
    f = expl.faithfulness
    ax.set_title(
        f"{_who(expl)}: {expl.size} of {expl.total_units} units kept, per reader\n"
        f"KL mean {f['kl_mean']:.3g}   logit diff recovered {f['logit_diff_recovered']:.2f}\n"
        "dimension units have no writer -> reader edges to draw; --units edges gives a circuit graph",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _reader_label(site: str) -> str:
    """``blocks.1.attn.in`` -> ``layer 1 attention (blocks.1.attn.in)``."""
    parts = site.split(".")
    if site == "unembed.in":
        return "logits (unembed.in)"
    if len(parts) >= 3 and parts[0] == "blocks":
        what = {"attn": "attention", "mlp": "MLP"}.get(parts[2], parts[2])
        extra = f" {parts[3]}" if len(parts) == 5 else ""
        return f"layer {parts[1]} {what}{extra} ({site})"
    return site
