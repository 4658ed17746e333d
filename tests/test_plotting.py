"""Pictures and side-by-side comparison: the circuit graph, the masks plot, the frontier, `compare`."""

import dataclasses
import json

import numpy as np
import pytest

from explainer.circuit import circuit_edges, circuit_figure, rollup_figure
from explainer.explanation import load
from explainer.export import example_circuit as example
from explainer.plotting import frontier_figure, masks_figure, unit_kind


def last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory, cli_here):
    """A short edge run of the shipped induction model (300 steps, seed 0)."""
    out = tmp_path_factory.mktemp("plots") / "induction-edges"
    args = ["--model", "induction", "--units", "edges", "--steps", "300", "--seed", "0", "--no-progress"]
    last_json(cli_here("train", *args, "--out", out, "--json"))
    return out


def drawn_edges(fig) -> set[str]:
    return {p.get_gid().removeprefix("edge:") for p in fig.axes[0].patches if (p.get_gid() or "").startswith("edge:")}


def test_show_graph_draws_the_induction_key_edge(edge_run, tmp_path, cli_here):
    picture = tmp_path / "circuit.png"
    result = last_json(cli_here("show", edge_run, "--graph", picture, "--json"))
    assert result["graph"] == str(picture) and picture.stat().st_size > 10_000
    expl = load(edge_run)
    fig, edges = circuit_figure(expl)
    names = {e.name for e in edges}
    assert names == set(result["edges"])  # every kept edge is drawn, and nothing else
    assert drawn_edges(fig) == names
    # K-composition: a layer-0 head writes into the key input of a layer-1 head (the induction mechanism)
    key_edges = [e for e in edges if e.writer.startswith("a0.h") and e.reader.startswith("a1.h") and e.port == "k"]
    assert key_edges, f"no layer-0 head -> layer-1 key edge among {sorted(names)}"
    assert all(e.name == f"{e.writer}->{e.reader}.k" and e.site == "blocks.1.attn.k.in" for e in key_edges)
    assert all(0.0 <= e.probability <= 1.0 for e in edges)


def test_circuit_edges_weights_and_repair_marks():
    expl = example()
    edges = {e.name: e for e in circuit_edges(expl)}
    assert edges["a0.h0->a1.h1.k"].port == "k" and edges["a0.h0->a1.h1.k"].reader == "a1.h1"
    assert edges["a0.h0->a1.h1.k"].probability < edges["embed->a0.h0.v"].probability
    assert not any(e.added for e in edges.values())
    expl.gate_logits["unembed.in"][4] = -2.0  # kept with a closed gate: added back by repair
    assert [e.name for e in circuit_edges(expl) if e.added] == ["a1.h1->logits"]
    style = {p.get_gid(): p.get_linestyle() for p in circuit_figure(expl)[0].axes[0].patches if p.get_gid()}
    assert style["edge:a1.h1->logits"] == "--" and style["edge:embed->a0.h0.v"] == "-"


def test_grouped_query_edges_enter_the_heads_that_share_them():
    """Under grouped-query attention a key/value edge feeds a key-value head (``a1.kv1.k``): it is
    drawn into the middle of the query heads that share it (a1.h2 and a1.h3)."""
    from explainer.circuit import _entry, _layout
    from explainer.edges import edge_names, edge_sites, edge_units
    from explainer.models.config import ModelConfig

    config = ModelConfig(
        n_layers=2, d_model=8, n_heads=4, d_head=2, n_key_value_heads=2, d_vocab=5, n_ctx=4, attn_only=True
    )
    n_units, names = edge_units(config, edge_sites(config)), edge_names(config)
    wanted = {
        "blocks.1.attn.k.in": "a0.h0->a1.kv1.k",
        "blocks.1.attn.v.in": "embed->a1.kv1.v",
        "unembed.in": "a1.h3->logits",
    }
    kept = {site: [names[site].index(name)] for site, name in wanted.items()}
    logits = {s: np.where(np.isin(np.arange(n), kept.get(s, [])), 2.0, -3.0) for s, n in n_units.items()}
    expl = dataclasses.replace(example(), kept=kept, n_units=n_units, gate_logits=logits)
    fig, edges = circuit_figure(expl, config)
    assert drawn_edges(fig) == set(wanted.values())
    assert {e.reader for e in edges} == {"a1.kv1", "logits"}
    pos, _ = _layout(config)
    assert _entry("a1.kv1", config, pos) == (pos["a1.h2"][0], (pos["a1.h2"][1] + pos["a1.h3"][1]) / 2)


def test_dimension_runs_get_a_roll_up_not_edges():
    expl = dataclasses.replace(example(), config={"units": "dims"})
    with pytest.raises(Exception, match="keeps residual dimensions"):
        circuit_edges(expl)
    ax = rollup_figure(expl).axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert " 1/2" in labels and " 1/6" in labels and " 0/6" in labels  # kept/total per site
    assert "logits (unembed.in)" in [t.get_text() for t in ax.get_yticklabels()]


def test_masks_plot_labels_units_and_hides_padding():
    expl = example()
    assert unit_kind(expl) == "writer (edge)"
    ax = masks_figure(expl).axes[0]
    assert ax.get_xlabel() == "unit (writer (edge))"
    image = ax.images[0]
    grid = image.get_array()
    assert np.ma.is_masked(grid) and grid.mask[0, 2:].all() and not grid.mask[3].any()  # layer 0 sites: 2 of 6
    cmap = image.get_cmap()
    bad = cmap.get_bad()  # padding: opaque, and not the colour of a closed gate (matplotlib's default is clear)
    assert bad[3] == 1.0 and tuple(bad[:3]) != pytest.approx(cmap(0.0)[:3], abs=0.05)
    assert "grey: no such unit" in ax.get_title()
    assert "h1:a0.h0" in [t.get_text() for t in ax.texts]  # edge cells carry their writer
    dims = dataclasses.replace(expl, config={"units": "dims", "basis": "learned"})
    assert unit_kind(dims) == "learned direction"
    assert unit_kind(dataclasses.replace(expl, config={})) == "residual dimension"


def test_masks_plot_marks_trimmed_units_and_curves_show_budget_gap_and_lambda():
    expl = example()
    expl.gate_logits["unembed.in"][0] = 3.0  # open but not kept: trimmed
    steps = 20
    expl.history = {
        "kl": [1.0] * steps,
        "size": [5.0] * steps,
        "gap": [0.1] * steps,
        "lambda": [0.01] * steps,
        "trimmed": [1.0],
    }
    expl.config = {"units": "edges", "kl_budget": 0.01, "target_size": None, "lam": None}
    fig = masks_figure(expl)
    assert "dropped by trim (1 units)" in fig.axes[0].get_title()
    curve_labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "KL budget 0.01" in curve_labels
    assert "adversary's gap (running mean)" in curve_labels
    assert "λ (size penalty)" in curve_labels


def test_frontier_draws_size_zero_at_zero():
    rec = lambda s, f: {"size": s, "normalized_faithfulness": f, "gap": 0.0}  # noqa: E731
    frontier = {"records": [rec(0, 0.0), rec(1, 0.3), rec(8, 1.0)], "cpr": 0.5, "cmd": 0.2}
    ax = frontier_figure({"ours": frontier}).axes[0]
    assert ax.get_xscale() == "symlog"
    xs = sorted(x for c in ax.collections for x, _ in c.get_offsets())
    assert xs == [0.0, 1.0, 8.0]
    assert ax.get_xlim()[0] < 0.0 < 1.0 < 8.0 < ax.get_xlim()[1]


def test_compare_json(edge_run, tmp_path, cli_here):
    other = load(edge_run)
    key = next(e for e in circuit_edges(other) if e.site == "blocks.1.attn.k.in")
    other.kept[key.site] = [u for u in other.kept[key.site] if u != key.unit]
    other.path = None
    b = other.save(tmp_path / "b")
    result = last_json(cli_here("compare", edge_run, b, "--json"))
    assert result["comparable"] is True and result["reason"] is None
    assert result["only_a"] == 1 and result["only_b"] == 0
    assert result["sites"][key.site]["only_a"] == [key.name]
    assert result["shared"] == result["a"]["size"] - 1 == result["b"]["size"]
    for side in ("a", "b"):
        assert {"size", "kl_mean", "logit_diff_recovered", "accuracy", "gap"} <= set(result[side])
    text = cli_here("compare", edge_run, b)
    assert text.returncode == 0 and key.name in text.stdout and "only_a" in text.stdout


def test_compare_refuses_folders_that_are_not_runs(edge_run, tmp_path, cli_here):
    proc = cli_here("compare", edge_run, tmp_path)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "frontier.json").write_text("{}")
    proc = cli_here("compare", sweep, edge_run)
    assert proc.returncode == 2 and "is a sweep folder" in proc.stderr


def test_explanation_plot_and_graph(tmp_path):
    expl = example()
    assert expl.graph(tmp_path / "g.png").is_file()
    assert expl.plot(tmp_path / "m.png").is_file()
    assert dataclasses.replace(expl, config={"units": "dims"}).graph(tmp_path / "r.png").is_file()
