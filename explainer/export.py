"""Export a run's explanation for other tools: per-unit scores, or a MIB circuit file.

``explainer export RUN --format json|mib [--out FILE]`` writes one of two files (by default into
the run folder, as ``units.json`` or ``mib.json``):

- ``json`` (:func:`units_json`): ``{"format": "explainer-units", "version": 1, "model", "task",
  "score": "gate_logit", "size", "total_units", "sites", "faithfulness", "units": [{"site",
  "unit", "score", "gate", "kept", "rank"}]}``. Units are listed site by site in
  forward order, then by unit index; ``score`` is the trained hard-concrete log-alpha of the unit's
  gate (higher: more needed), ``gate`` the gate's test-time value in [0, 1], ``rank`` its place when all
  units are sorted by score (1 = highest; ties keep the listing order). ``kept`` is the finished
  explanation, which can include a unit with a low score (``repair`` adds units back by exact
  search) or, with ``target_size``, leave out a positive one.
- ``mib`` (:func:`mib_json`): the circuit-localisation format of MIB (the Mechanistic
  Interpretability Benchmark; EAP-IG's ``Graph.to_json``/``from_json``): ``{"cfg": {n_layers,
  n_heads, parallel_attn_mlp, d_model}, "nodes": {name: {"in_graph"}}, "edges": {name: {"score",
  "in_graph"}}}`` over MIB's graph: nodes ``input``, ``a{l}.h{h}``, ``m{l}``, ``logits``; edges
  ``src->a{l}.h{h}<q|k|v>``, ``src->m{l}``, ``src->logits`` from every earlier node. In a model
  with parallel blocks (GPT-NeoX's ``use_parallel_residual``, GPT-J: ``parallel_attn_mlp`` is true
  in ``cfg``) the MLP reads the block's input, as its attention does, so ``m{l}``'s sources are the
  nodes before layer ``l``: there is no edge ``a{l}.h{h}->m{l}`` (MIB's graph for such a model;
  our edge units count the same writers, :func:`explainer.edges.n_writers`).

How our units map onto MIB's edges, and what is approximate: a unit is one residual dimension read
by one reader (site ``blocks.{l}.attn.in``: every head of layer ``l``, its q, k and v inputs;
``blocks.{l}.mlp.in``: ``m{l}``; ``unembed.in``: ``logits``; ``blocks.{l}.attn.{q,k,v}.in``, where
a run has them, the one input). Keeping a dimension lets *every* earlier writer through on that
dimension, so each MIB edge ``S -> D`` gets the score of ``D``'s site: the expected number of
dimensions its reader keeps (the sum of its gates' test-time values, each in [0, 1]), and ``in_graph`` is true when the
site keeps at least one dimension and ``S`` is live (``input``, or a node whose own reader keeps
something: a node that reads only resampled inputs writes what the resampled run writes, so its
edges would change nothing and are left out of the count). All edges into one reader therefore
share a score, and how many dimensions an edge passes is lost; that is exact only at the level of
readers. Runs trained with edge units (``--units edges``, :mod:`explainer.edges`) map one to one
instead: our edge ``embed->a0.h1.q`` is MIB's ``input->a0.h1<q>``, its score the gate's test-time
value and ``in_graph`` whether the run keeps it (an ``attn.in`` edge site gives every head's q, k
and v the same edge). Under grouped-query attention our key and value readers are the key/value
heads (``embed->a0.kv1.k``), which MIB ungroups: query head ``h`` reads key/value head
``h // (n_heads / n_kv_heads)``, so our edge ``S->a{l}.kv{j}.k`` becomes MIB's edges
``S->a{l}.h{h}<k>`` for every query head ``h`` of group ``j``, each with the grouped edge's score and
``in_graph`` (and likewise for ``v``; queries are per head in both).
For models without MLPs (``attn_only``) the ``m{l}`` nodes and their edges are listed with score 0,
never in the graph. A run is one circuit; MIB derives nested circuits from the scores itself (or
export each run of a sweep).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from explainer.circuit import model_config
from explainer.errors import ExplainerError, did_you_mean
from explainer.explanation import FAITHFULNESS_KEYS, Explanation, load
from explainer.models.config import ModelConfig
from explainer.models.native import write_json

FORMATS = ("json", "mib")
_KV_READER = re.compile(r"^a(\d+)\.kv(\d+)\.([kv])$")  # our key/value reader under grouped-query attention
DEFAULT_NAMES = {"json": "units.json", "mib": "mib.json"}
_SITE = re.compile(r"blocks\.(\d+)\.(attn|mlp)(?:\.([qkv]))?\.in$")


def gate_values(logits: np.ndarray) -> np.ndarray:
    """The test-time value in [0, 1] of hard-concrete gates with these log-alphas
    (:meth:`explainer.masks.Gates.deterministic`): 0 for a closed gate, 1 for a surely open one."""
    from explainer.masks import GAMMA, ZETA

    sigmoid = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    return np.clip(sigmoid * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def units_json(expl: Explanation) -> dict[str, Any]:
    """Every unit of the explanation with its gate logit, keep probability, rank and kept flag.

    >>> e = example_explanation()
    >>> [(u["site"], u["unit"], u["rank"]) for u in units_json(e)["units"] if u["kept"]]
    [('blocks.0.attn.in', 0, 2), ('unembed.in', 1, 1)]
    """
    rows = []
    for site, n in expl.n_units.items():
        logits = np.asarray(expl.gate_logits[site], np.float64).reshape(n)
        gates = gate_values(logits)
        kept = set(expl.kept.get(site, []))
        rows += [
            {"site": site, "unit": u, "score": float(logits[u]), "gate": float(gates[u]), "kept": u in kept}
            for u in range(n)
        ]
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
    return {
        "format": "explainer-units",
        "version": 1,
        "model": expl.model,
        "task": expl.task,
        "score": "gate_logit",
        "size": expl.size,
        "total_units": expl.total_units,
        "sites": dict(expl.n_units),
        "faithfulness": expl.faithfulness,
        "units": rows,
    }


def _readers(expl: Explanation, cfg: ModelConfig) -> dict[str, list[str]]:
    """MIB destination names (``a0.h1<q>``, ``m0``, ``logits``) fed by each site of the run."""
    out: dict[str, list[str]] = {}
    for site, n in expl.n_units.items():
        if n != cfg.d_model:
            raise ExplainerError(
                f"site {site!r} has {n} units, not d_model={cfg.d_model} residual dimensions; "
                "--format mib maps dimension units only (use --format json)"
            )
        if site == "unembed.in":
            out[site] = ["logits"]
            continue
        match = _SITE.fullmatch(site)
        if match is None:
            raise ExplainerError(f"site {site!r} has no counterpart in MIB's graph; use --format json")
        layer, kind, qkv = int(match[1]), match[2], match[3]
        if kind == "mlp":
            out[site] = [f"m{layer}"]
        else:
            out[site] = [f"a{layer}.h{h}<{x}>" for h in range(cfg.n_heads) for x in (qkv or "qkv")]
    return out


def _mib_edges(expl: Explanation, cfg: ModelConfig) -> dict[str, tuple[float, bool]]:
    """``{MIB edge: (score, kept)}`` of a run with edge units."""
    from explainer.edges import edge_names

    out = {}
    for site, names in edge_names(cfg, list(expl.n_units)).items():
        values, kept = gate_values(expl.gate_logits[site]), set(expl.kept.get(site, []))
        for unit, name in enumerate(names):
            src, dst = name.replace("embed", "input").split("->")
            grouped = _KV_READER.match(dst)
            if grouped:  # a{l}.kv{j}.k -> a{l}.h{h}<k> for each query head h of group j (MIB ungroups)
                layer, kv, x = grouped.groups()
                group = cfg.n_heads // cfg.n_kv_heads
                heads = [f"a{layer}.h{h}<{x}>" for h in range(int(kv) * group, (int(kv) + 1) * group)]
            elif dst.count(".") == 2:  # a{l}.h{h}.q -> a{l}.h{h}<q>
                heads = [f"{dst[:-2]}<{dst[-1]}>"]
            elif dst.count(".") == 0 and dst[0] == "a":
                heads = [f"{dst}.h{h}<{x}>" for h in range(cfg.n_heads) for x in "qkv"]
            else:
                heads = [dst]
            for d in heads:
                out[f"{src}->{d}"] = (float(values[unit]), unit in kept)
    return out


def mib_json(expl: Explanation, cfg: ModelConfig) -> dict[str, Any]:
    """The explanation as a MIB edge-level circuit with importance scores (see the module docstring)."""
    score: dict[str, float] = {}
    kept: dict[str, bool] = {}
    per_edge = _mib_edges(expl, cfg) if expl.config.get("units") == "edges" else None
    for site, destinations in ({} if per_edge is not None else _readers(expl, cfg)).items():
        s = float(gate_values(expl.gate_logits[site]).sum())
        for d in destinations:
            score[d], kept[d] = s, bool(expl.kept.get(site))
    nodes, edges = _mib_graph(cfg, score, kept, per_edge)
    stray = sorted(set(per_edge or ()) - set(edges))
    if stray:  # every edge of the run is one of MIB's (a parallel MLP has no edge from its own layer's heads)
        raise ExplainerError(f"edge(s) {stray[:3]} of this run have no counterpart in MIB's graph; use --format json")
    return {
        "cfg": {
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "parallel_attn_mlp": cfg.parallel_attn_mlp,
            "d_model": cfg.d_model,
        },
        "nodes": nodes,
        "edges": edges,
    }


def _mib_graph(
    cfg: ModelConfig,
    score: dict[str, float],
    kept: dict[str, bool],
    per_edge: dict[str, tuple[float, bool]] | None = None,
) -> tuple[dict, dict]:
    """MIB's node and edge lists (EAP-IG ``Graph.from_model`` order), with our scores filled in.

    A node other than ``input`` is live when its reader keeps something; an edge is in the graph when
    its destination keeps something and its source is live (a source that reads only resampled
    inputs writes what the resampled run writes, so its edges would change nothing). ``per_edge``
    (runs with edge units) gives each edge its own ``(score, kept)`` instead.
    """
    edges: dict[str, dict[str, Any]] = {}
    has_mlp = not cfg.attn_only
    upstream = ["input"]
    live = {"input": True}

    def add(src: str, dst: str) -> None:
        real = has_mlp or not (src.startswith("m") or dst.startswith("m"))
        if per_edge is not None:
            s, k = per_edge.get(f"{src}->{dst}", (0.0, False))
            edges[f"{src}->{dst}"] = {"score": s if real else 0.0, "in_graph": bool(real and k)}
            return
        edges[f"{src}->{dst}"] = {
            "score": score.get(dst, 0.0) if real else 0.0,
            "in_graph": bool(real and live[src] and kept.get(dst, False)),
        }

    for layer in range(cfg.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(cfg.n_heads)]
        for src in upstream:
            for head in heads:
                for x in "qkv":
                    add(src, f"{head}<{x}>")
            if cfg.parallel_attn_mlp:  # the MLP reads the block's input, as the heads do
                add(src, f"m{layer}")
        for head in heads:
            live[head] = any(kept.get(f"{head}<{x}>", False) for x in "qkv")
        upstream += heads
        if not cfg.parallel_attn_mlp:
            for src in upstream:
                add(src, f"m{layer}")
        live[f"m{layer}"] = has_mlp and kept.get(f"m{layer}", False)
        upstream.append(f"m{layer}")
    for src in upstream:
        add(src, "logits")
    outgoing = {e.split("->")[0] for e, v in edges.items() if v["in_graph"]}
    nodes = {name: {"in_graph": name in outgoing} for name in upstream}
    nodes["logits"] = {"in_graph": True}
    return nodes, edges


def example_explanation() -> Explanation:
    """A hand-made explanation of ``planted-distractor`` (for examples and tests; nothing is trained)."""
    units = np.arange(10)
    return Explanation(
        kept={"blocks.0.attn.in": [0], "unembed.in": [1]},
        n_units={"blocks.0.attn.in": 10, "unembed.in": 10},
        gate_logits={
            "blocks.0.attn.in": np.where(units == 0, 2.0, -3.5).astype(np.float32),
            "unembed.in": np.where(units == 1, 4.0, -3.0).astype(np.float32),
        },
        model={"name": "planted-distractor"},
        task={"name": "planted-distractor", "source": "model"},
        config={},
        faithfulness=dict.fromkeys(FAITHFULNESS_KEYS, 0.0) | {"accuracy": 1.0, "logit_diff_recovered": 1.0},
    )


def model_config_of(expl: Explanation) -> ModelConfig:
    """The config of the model a run explains (its weights are not needed)."""
    return model_config(expl)


def export_run(run: str | os.PathLike, format: str = "json", out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the run's explanation as ``format`` (``json`` or ``mib``) to ``out`` (default: into the run).

    >>> import tempfile
    >>> run = example_explanation().save(tempfile.mkdtemp() + "/run")
    >>> r = export_run(run, "mib")
    >>> r["edges"], r["edges_in_graph"]  # 1 layer, 2 heads, no MLP: 13 MIB edges
    (13, 9)
    """
    if format not in FORMATS:
        raise ExplainerError(f"unknown export format {format!r}; {did_you_mean(format, FORMATS)}")
    expl = load(run)
    data = units_json(expl) if format == "json" else mib_json(expl, model_config_of(expl))
    target = Path(out) if out is not None else Path(run) / DEFAULT_NAMES[format]
    if target.is_dir():
        hint = target / DEFAULT_NAMES[format]
        raise ExplainerError(f"--out {str(target)!r} is a folder; give a file name, e.g. {hint}")
    if not target.parent.is_dir():
        raise ExplainerError(f"the folder of --out {str(target)!r} does not exist; create it first")
    write_json(target, data)
    result: dict[str, Any] = {"run": str(run), "format": format, "out": str(target), "size": expl.size}
    if format == "json":
        result["units"] = len(data["units"])
    else:
        result["edges"] = len(data["edges"])
        result["edges_in_graph"] = sum(e["in_graph"] for e in data["edges"].values())
    return result


def example_circuit() -> Explanation:
    """A hand-made edge explanation of the shipped ``induction`` model (for examples; nothing trained):
    head ``a0.h0`` feeds the key of ``a1.h1`` (K-composition), which writes the answer to the logits.
    """
    from explainer.edges import edge_sites, edge_units
    from explainer.models.config import ModelConfig

    config = ModelConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=4, attn_only=True)
    n_units = edge_units(config, edge_sites(config))
    kept = {"blocks.0.attn.v.in": [0], "blocks.1.attn.k.in": [4], "blocks.1.attn.v.in": [3], "unembed.in": [4]}
    logits = {site: np.full(n, -3.0, np.float32) for site, n in n_units.items()}
    for site, units in kept.items():
        logits[site][units] = 2.0
    logits["blocks.1.attn.k.in"][4] = 0.5
    return Explanation(
        kept=kept,
        n_units=n_units,
        gate_logits=logits,
        model={"name": "induction"},
        task={"name": "induction", "source": "model"},
        config={"units": "edges"},
        faithfulness=dict.fromkeys(FAITHFULNESS_KEYS, 0.0) | {"accuracy": 1.0, "logit_diff_recovered": 1.0},
    )
