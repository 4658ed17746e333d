"""explainer export: per-unit scores (plain JSON) and MIB circuit files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from explainer.errors import ExplainerError
from explainer.explanation import FAITHFULNESS_KEYS, Explanation
from explainer.export import example_explanation, export_run, mib_json, model_config_of, units_json

IOI_SITES = ["blocks.0.attn.in", "blocks.0.mlp.in", "blocks.1.attn.in", "blocks.1.mlp.in", "unembed.in"]


def ioi_explanation(kept: dict[str, list[int]]) -> Explanation:
    """A hand-made explanation of the zoo's ioi model (2 layers, 4 heads, MLPs, d_model 64)."""
    rng = np.random.default_rng(0)
    logits = {site: rng.normal(-4.0, 1.0, 64).astype(np.float32) for site in IOI_SITES}
    for site, units in kept.items():
        logits[site][units] = 3.0 + np.arange(len(units), dtype=np.float32)
    return Explanation(
        kept=kept,
        n_units=dict.fromkeys(IOI_SITES, 64),
        gate_logits=logits,
        model={"name": "ioi"},
        task={"name": "ioi", "source": "model"},
        config={},
        faithfulness=dict.fromkeys(FAITHFULNESS_KEYS, 0.5),
    )


def test_units_json():
    e = ioi_explanation({"blocks.1.attn.in": [5, 9], "unembed.in": [2]})
    data = units_json(e)
    assert {"format", "version", "model", "task", "score", "size", "total_units", "units"} <= set(data)
    units = data["units"]
    assert len(units) == 5 * 64 == data["total_units"] and data["size"] == 3
    assert [(u["site"], u["unit"]) for u in units] == [(s, i) for s in IOI_SITES for i in range(64)]
    assert {(u["site"], u["unit"]) for u in units if u["kept"]} == {
        ("blocks.1.attn.in", 5), ("blocks.1.attn.in", 9), ("unembed.in", 2)
    }  # fmt: skip
    for u in units:
        assert u["score"] == pytest.approx(float(e.gate_logits[u["site"]][u["unit"]]))
        assert 0.0 <= u["gate"] <= 1.0 and (u["gate"] == 1.0) == (u["score"] >= 3.0)
    by_rank = sorted(units, key=lambda u: u["rank"])
    assert [u["rank"] for u in by_rank] == list(range(1, len(units) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(by_rank, by_rank[1:], strict=False))
    assert all(u["kept"] for u in by_rank[:3])  # here the kept units have the highest gates
    gates = [u["gate"] for u in by_rank]
    assert gates == sorted(gates, reverse=True)


def test_mib_graph_matches_eap_ig():
    """MIB's edge graph for 2 layers x 4 heads with MLPs has 110 edges (q, k, v counted apart)."""
    e = ioi_explanation({"blocks.1.attn.in": [5], "unembed.in": [2, 3]})
    data = mib_json(e, model_config_of(e))
    assert data["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 64}
    assert len(data["edges"]) == 110
    heads = [f"a{layer}.h{h}" for layer in range(2) for h in range(4)]
    assert set(data["nodes"]) == {"input", "m0", "m1", "logits", *heads}
    edges = data["edges"]
    assert set(edges["input->a1.h2<k>"]) == {"score", "in_graph"}
    in_graph = {name for name, v in edges.items() if v["in_graph"]}
    # layer 1's heads read from live sources (input only: nothing of layer 0 keeps anything);
    # the logits read from input and the (live) layer-1 heads
    expected = {f"input->a1.h{h}<{x}>" for h in range(4) for x in "qkv"}
    expected |= {"input->logits"} | {f"a1.h{h}->logits" for h in range(4)}
    assert in_graph == expected
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == {"input", "logits"} | set(heads[4:])
    # all edges into one reader share its score: the expected number of dimensions it keeps
    into_logits = {v["score"] for name, v in edges.items() if name.endswith("->logits")}
    assert len(into_logits) == 1
    assert edges["a0.h0->logits"]["score"] == pytest.approx(2.0, abs=0.5)  # two open gates, the rest ~closed
    assert edges["a0.h0->logits"]["score"] > edges["input->m0"]["score"]


def test_mib_attention_only_model_has_no_mlp_edges(tmp_path):
    data = mib_json(example_explanation(), model_config_of(example_explanation()))
    assert len(data["edges"]) == 13
    for name, v in data["edges"].items():
        if "m0" in name:
            assert v == {"score": 0.0, "in_graph": False}
    assert data["nodes"]["m0"] == {"in_graph": False}


def test_mib_refuses_units_that_are_not_dimensions():
    e = example_explanation()
    e.n_units["blocks.0.attn.in"] = 3
    e.gate_logits["blocks.0.attn.in"] = np.zeros(3, np.float32)
    with pytest.raises(ExplainerError, match="maps dimension units only"):
        mib_json(e, model_config_of(e))


def test_export_run_files_and_errors(tmp_path):
    run = example_explanation().save(tmp_path / "run")
    result = export_run(run, "json")
    assert result["out"] == str(run / "units.json") and result["units"] == 20
    assert json.loads((run / "units.json").read_text())["format"] == "explainer-units"
    with pytest.raises(ExplainerError, match="unknown export format 'xml'"):
        export_run(run, "xml")
    with pytest.raises(ExplainerError, match="is a folder"):
        export_run(run, "mib", tmp_path)
    with pytest.raises(ExplainerError, match="does not exist; create it first"):
        export_run(run, "mib", tmp_path / "no" / "mib.json")


def test_cli_export(tmp_path, cli_here):
    run = ioi_explanation({"blocks.0.mlp.in": [1], "unembed.in": [0]}).save(tmp_path / "run")
    target = tmp_path / "ioi_explainer.json"
    cli = cli_here

    proc = cli("export", run, "--format", "mib", "--out", target, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    data = json.loads(target.read_text())
    assert result["edges"] == len(data["edges"]) == 110
    assert (
        result["edges_in_graph"] == sum(v["in_graph"] for v in data["edges"].values()) == 3
    )  # input->m0, input->logits, m0->logits
    bad = cli("export", run, "--format", "xml")
    assert bad.returncode == 2 and "unknown export format" in bad.stderr
