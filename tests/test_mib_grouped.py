"""MIB export of edge runs under grouped-query attention: our key/value-head edges, ungrouped."""

import numpy as np

from explainer.edges import edge_names, edge_sites, edge_units
from explainer.explanation import FAITHFULNESS_KEYS, Explanation
from explainer.export import _mib_edges, mib_json
from explainer.models import ModelConfig


def test_grouped_key_value_edges_map_onto_every_query_head_of_their_group():
    cfg = ModelConfig(
        n_layers=2, d_model=8, n_heads=4, d_head=2, d_vocab=5, n_ctx=4, attn_only=True, n_key_value_heads=2
    )
    n_units = edge_units(cfg, edge_sites(cfg))
    names = edge_names(cfg)
    logits = {site: np.full(n, -3.0, np.float32) for site, n in n_units.items()}
    unit = names["blocks.1.attn.k.in"].index("a0.h2->a1.kv1.k")
    logits["blocks.1.attn.k.in"][unit] = 2.0
    expl = Explanation(
        kept={"blocks.1.attn.k.in": [unit]},
        n_units=n_units,
        gate_logits=logits,
        model={"name": "gqa"},
        task={"name": "t", "source": "builtin"},
        config={"units": "edges"},
        faithfulness=dict.fromkeys(FAITHFULNESS_KEYS, 0.0),
    )
    edges = mib_json(expl, cfg)["edges"]
    kept = {name for name, e in edges.items() if e["in_graph"]}
    assert kept == {"a0.h2->a1.h2<k>", "a0.h2->a1.h3<k>"}  # group 1 = query heads 2 and 3
    assert edges["a0.h2->a1.h2<k>"]["score"] == edges["a0.h2->a1.h3<k>"]["score"] > 0.5
    assert edges["a0.h2->a1.h1<k>"]["score"] < 0.5
    assert set(_mib_edges(expl, cfg)) <= set(edges)  # every edge of ours lands on one of MIB's
