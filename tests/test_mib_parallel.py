"""MIB export for parallel blocks (GPT-NeoX's parallel residual, GPT-J): the MLP reads the block's input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import explainer
from explainer.edges import n_writers, writer_names
from explainer.export import _mib_edges, export_run, mib_json, model_config_of
from explainer.models import ModelConfig, init_random, save_model

NEOX = ModelConfig(
    n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=50, n_ctx=16, act_fn="gelu",
    positional_embedding_type="rotary", rotary_dim=2, parallel_attn_mlp=True,
)  # fmt: skip
L, H = NEOX.n_layers, NEOX.n_heads


def _prompts(n: int = 16, length: int = 6) -> dict:
    rng = np.random.default_rng(1)
    rows = [
        {"clean": rng.integers(0, 50, length).tolist(), "corrupt": rng.integers(0, 50, length).tolist(),
         "answers": [1], "wrong_answers": [2]}
        for _ in range(n)
    ]  # fmt: skip
    return {"prompts": rows}


def mib_edge_names(cfg: ModelConfig) -> set[str]:
    """MIB's edges for ``cfg``, from the writers each reader of the model has (:mod:`explainer.edges`)."""
    writers = [w.replace("embed", "input") for w in writer_names(cfg)]
    names = set()
    for layer in range(cfg.n_layers):
        for w in writers[: n_writers(cfg, f"blocks.{layer}.attn.q.in")]:
            names |= {f"{w}->a{layer}.h{h}<{x}>" for h in range(cfg.n_heads) for x in "qkv"}
        names |= {f"{w}->m{layer}" for w in writers[: n_writers(cfg, f"blocks.{layer}.mlp.in")]}
    return names | {f"{w}->logits" for w in writers}


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    folder = tmp_path_factory.mktemp("neox") / "model"
    save_model(init_random(NEOX, jax.random.key(0), std=0.3), folder)
    return folder


def test_parallel_mlp_reads_the_block_input(neox):
    """The model itself: a parallel MLP's input does not change with its own layer's attention."""
    model = explainer.models.load_model(neox)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 6)))
    site = "blocks.1.mlp.in"
    _, seen = model.run(tokens, capture=[site])
    blocks = list(model.blocks)
    blocks[1] = dataclasses.replace(blocks[1], attn=dataclasses.replace(blocks[1].attn, W_O=blocks[1].attn.W_O * 3))
    _, changed = dataclasses.replace(model, blocks=tuple(blocks)).run(tokens, capture=[site])
    np.testing.assert_array_equal(np.asarray(seen[site]), np.asarray(changed[site]))


def test_mib_graph_of_parallel_blocks_has_no_same_layer_attention_to_mlp_edge():
    data = mib_json(explainer.export.example_explanation(), dataclasses.replace(NEOX, d_model=10))
    assert data["cfg"]["parallel_attn_mlp"] is True
    edges = set(data["edges"])
    # per layer, 1 + l (H + 1) sources feed 3H head inputs and the MLP; every node feeds the logits
    assert len(edges) == sum((1 + layer * (H + 1)) * (3 * H + 1) for layer in range(L)) + 1 + L * (H + 1) == 102
    assert edges == mib_edge_names(NEOX)
    assert not {e for e in edges for layer in range(L) if e.startswith(f"a{layer}.") and e.endswith(f"->m{layer}")}
    assert "a0.h3->m1" in edges and "m0->m1" in edges and "m0->a1.h0<q>" in edges
    sequential = mib_json(
        explainer.export.example_explanation(), dataclasses.replace(NEOX, d_model=10, parallel_attn_mlp=False)
    )
    assert sequential["cfg"]["parallel_attn_mlp"] is False and len(sequential["edges"]) == 110


@pytest.mark.parametrize("units", ["dims", "edges"])
def test_export_of_runs_on_a_parallel_model(neox, tmp_path, units):
    found = explainer.explain(
        str(neox), _prompts(), steps=20, progress=False, adversary="none", units=units, out=tmp_path / "run"
    )
    cfg = model_config_of(found)
    assert cfg.parallel_attn_mlp
    data = mib_json(found, cfg)
    heads = {f"a{layer}.h{h}" for layer in range(L) for h in range(H)}
    assert set(data["nodes"]) == {"input", "logits", "m0", "m1", *heads}
    assert set(data["edges"]) == mib_edge_names(cfg)
    if units == "edges":  # one to one: every edge of the run is one of MIB's, and the other way round
        ours = _mib_edges(found, cfg)
        assert set(ours) == set(data["edges"])
        assert {e for e, v in data["edges"].items() if v["in_graph"]} == {e for e, (_, k) in ours.items() if k}
    in_graph = {e for e, v in data["edges"].items() if v["in_graph"]}
    assert not {e for e in in_graph for layer in range(L) if e.startswith(f"a{layer}.") and e.endswith(f"->m{layer}")}
    result = export_run(tmp_path / "run", "mib")
    assert result["edges"] == 102 and result["edges_in_graph"] == len(in_graph)
