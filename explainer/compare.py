"""Two explanations side by side: which units both keep, which only one keeps, and their metrics.

``explainer compare RUN RUN`` prints :func:`describe` of :func:`compare_runs`; with ``--json`` the
dict itself. Units are compared index by index only where that means the same thing: the same
model, the same kind of unit, the same sites with the same number of units, and the standard basis
(two learned rotations number different directions). Otherwise ``comparable`` is false, ``reason``
says why, and only the metrics are put side by side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from explainer.errors import ExplainerError
from explainer.explanation import JSON_FILE, Explanation, load
from explainer.models.native import read_json

METRICS = ("kl_mean", "kl_p99", "logit_diff_recovered", "accuracy")


def _open(run: str | os.PathLike) -> Explanation:
    path = Path(run)
    if path.is_dir() and not (path / JSON_FILE).is_file() and (path / "frontier.json").is_file():
        rungs = sorted(p.name for p in (path / "runs").glob("*") if (p / JSON_FILE).is_file())
        example = f" (e.g. {path / 'runs' / rungs[0]})" if rungs else ""
        raise ExplainerError(f"{str(path)!r} is a sweep folder, not a run; compare two of its rungs{example}")
    return load(path)


def metrics(expl: Explanation) -> dict[str, Any]:
    """Size, held-out faithfulness and (from ``attack.json``) the adversarial gap of one run."""
    f = expl.faithfulness
    out: dict[str, Any] = {
        "run": str(expl.path),
        "units": expl.config.get("units", "dims"),
        "size": expl.size,
        "total_units": expl.total_units,
    }
    out |= {k: f.get(k) for k in METRICS}
    attack = read_json(expl.path / "attack.json") if expl.path and (expl.path / "attack.json").is_file() else {}
    gap = attack.get("gap") if isinstance(attack, dict) else None
    out["gap"] = gap.get("kl_mean") if isinstance(gap, dict) else None
    out["gap_budget"] = attack.get("budget") if gap is not None else None
    return out


def _why_not(a: Explanation, b: Explanation) -> str | None:
    """Why the units of ``a`` and ``b`` cannot be matched by index, or None."""
    units = a.config.get("units", "dims"), b.config.get("units", "dims")
    model = [e.model.get("sha256") or e.model.get("name") or e.model.get("path") for e in (a, b)]
    if model[0] != model[1]:
        return "they explain different models (or different weights)"
    if units[0] != units[1]:
        return f"their units differ ({units[0]} against {units[1]})"
    if a.n_units != b.n_units:
        return "their sites differ (other sites, or other numbers of units)"
    if a.bases or b.bases:
        return "a run has its own basis (learned or fitted directions), so unit i is not the same direction in both"
    return None


def _names(expl: Explanation) -> dict[str, list[str]] | None:
    """Edge names per site for an edge run, when the model's configuration can be read."""
    if expl.config.get("units", "dims") != "edges":
        return None
    from explainer.circuit import model_config
    from explainer.edges import edge_names

    try:
        return edge_names(model_config(expl), list(expl.n_units))
    except ExplainerError:
        return None


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> dict[str, Any]:
    """Compare two run folders: ``a``/``b`` metrics, and per site the units both or only one keep.

    ``sites`` lists only sites where either run keeps something; edges are given by name
    (``a0.h0->a1.h1.k``) in edge runs, as unit indices otherwise. ``shared``, ``only_a``,
    ``only_b`` count units over all sites and ``jaccard`` is shared / either.

    >>> import tempfile
    >>> from explainer.export import example_circuit as example
    >>> folder = tempfile.mkdtemp()
    >>> a, b = example(), example()
    >>> b.kept["blocks.1.attn.k.in"] = []
    >>> r = compare_runs(a.save(folder + "/a"), b.save(folder + "/b"))
    >>> r["comparable"], r["shared"], r["only_a"], r["only_b"], r["jaccard"]
    (True, 3, 1, 0, 0.75)
    >>> r["sites"]["blocks.1.attn.k.in"]
    {'shared': [], 'only_a': ['a0.h0->a1.h1.k'], 'only_b': []}
    """
    a, b = _open(run_a), _open(run_b)
    result: dict[str, Any] = {"a": metrics(a), "b": metrics(b)}
    reason = _why_not(a, b)
    result |= {"comparable": reason is None, "reason": reason}
    if reason is not None:
        return result | {"sites": {}, "shared": None, "only_a": None, "only_b": None, "jaccard": None}
    names = _names(a)
    sites, counts = {}, {"shared": 0, "only_a": 0, "only_b": 0}
    for site in a.n_units:
        ka, kb = set(a.kept.get(site, [])), set(b.kept.get(site, []))
        if not ka | kb:
            continue
        parts = {"shared": sorted(ka & kb), "only_a": sorted(ka - kb), "only_b": sorted(kb - ka)}
        for key, units in parts.items():
            counts[key] += len(units)
        sites[site] = {k: [names[site][u] for u in v] for k, v in parts.items()} if names else parts
    either = sum(counts.values())
    return result | {"sites": sites, **counts, "jaccard": counts["shared"] / either if either else 1.0}


def describe(result: dict[str, Any]) -> str:
    """The comparison for people: a metrics table, then per site what is shared and what differs."""
    a, b = result["a"], result["b"]
    rows = [
        ("run", a["run"], b["run"]),
        ("units", a["units"], b["units"]),
        ("size", f"{a['size']}/{a['total_units']}", f"{b['size']}/{b['total_units']}"),
        *((k.replace("_", " "), _num(a[k]), _num(b[k])) for k in METRICS),
        ("gap", _gap(a), _gap(b)),
    ]
    width = max(len(str(r[1])) for r in rows)
    lines = [f"{name:<22} {str(x):<{width}}  {y}" for name, x, y in rows]
    if not result["comparable"]:
        return "\n".join([*lines, f"units not compared: {result['reason']}"])
    lines.append(
        f"units: {result['shared']} shared, {result['only_a']} only in a, {result['only_b']} only in b "
        f"(Jaccard {result['jaccard']:.2f})"
    )
    for site, parts in result["sites"].items():
        lines.append(f"  {site}")
        lines += [f"    {key:<7} {units}" for key, units in parts.items() if units]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _gap(m: dict[str, Any]) -> str:
    return "- (no attack.json)" if m["gap"] is None else f"{m['gap']:.4g} at budget {m['gap_budget']}"
