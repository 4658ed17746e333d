"""Edge units: writers into readers (``--units edges``), the graph of Edge Pruning and auto-circuit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from explainer import edges
from explainer.errors import ExplainerError
from explainer.models import ModelConfig, init_random, load_model
from explainer.models.padding import PAD
from explainer.scrub import Scrubber
from explainer.tasks import resolve_task
from explainer.tasks.base import Batch
from explainer.zoo import resolve_model

CFG = ModelConfig(n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=11, n_ctx=8)


@pytest.fixture(scope="module")
def tiny():
    model = init_random(CFG, jax.random.key(0))
    clean = jax.random.randint(jax.random.key(1), (6, 5), 0, CFG.d_vocab)
    corrupt = jax.random.randint(jax.random.key(2), (6, 5), 0, CFG.d_vocab)
    answers = jax.random.randint(jax.random.key(3), (6, 1), 0, CFG.d_vocab)
    batch = Batch(clean=clean, corrupt=corrupt, answers=answers, wrong_answers=(answers + 1) % CFG.d_vocab)
    return model, batch


def test_graph_matches_auto_circuit_edge_count():
    """2 layers, 4 heads, MLPs: 110 edges with per-head q/k/v inputs (auto-circuit's count)."""
    sites = edges.edge_sites(CFG)
    n = edges.edge_units(CFG, sites)
    assert sum(n.values()) == 110
    assert n["blocks.1.attn.q.in"] == 4 * 6 and n["blocks.1.mlp.in"] == 10 and n["unembed.in"] == 11
    names = edges.edge_names(CFG)
    flat = [name for site in sites for name in names[site]]
    assert len(flat) == len(set(flat)) == 110
    assert names["blocks.1.attn.k.in"][6 * 2 + 5] == "m0->a1.h2.k"  # head-major: head 2, writer 5 (m0)
    # one mask per attention layer instead: every head and q/k/v share the writers
    shared = edges.edge_units(CFG, edges.edge_sites(CFG, qkv=False))
    assert sum(shared.values()) == 1 + 5 + 6 + 10 + 11


def test_forward_ends_are_the_full_model(tiny):
    model, batch = tiny
    scrubber = Scrubber.build(model, batch, units="edges")
    full, repl = scrubber.reference(batch, jax.random.key(0))
    ones = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    zeros = {s: jnp.zeros(n) for s, n in scrubber.n_units.items()}
    np.testing.assert_allclose(scrubber.logits(batch.clean, ones, repl), full, atol=1e-5)
    on_corrupt = model(batch.corrupt)[:, -1]
    np.testing.assert_allclose(scrubber.logits(batch.clean, zeros, repl), on_corrupt, atol=1e-5)


def test_one_edge_changes_only_its_reader(tiny):
    """Resampling one edge a0.h1 -> m0 equals patching head 1's output into m0's input alone."""
    model, batch = tiny
    scrubber = Scrubber.build(model, batch, units="edges")
    full, repl = scrubber.reference(batch, jax.random.key(0))
    names = edges.edge_names(CFG)["blocks.0.mlp.in"]
    keep = {s: jnp.ones(n) for s, n in scrubber.n_units.items()}
    keep["blocks.0.mlp.in"] = keep["blocks.0.mlp.in"].at[names.index("a0.h1->m0")].set(0.0)
    got = scrubber.logits(batch.clean, keep, repl)

    def patched(tokens):  # by hand: m0 reads clean residual - head1(clean) + head1(corrupt)
        _, own = edges.run(model, tokens, capture=True)
        _, other = edges.run(model, batch.corrupt, capture=True)
        delta = other[:, :, 2] - own[:, :, 2]  # writer 2 = a0.h1

        def edit(site, h):
            return h + delta if site == "blocks.0.mlp.in" else h

        return model(tokens, edit=edit)[:, -1]

    np.testing.assert_allclose(got, patched(batch.clean), atol=1e-5)
    assert float(jnp.abs(got - full).max()) > 1e-3  # the edge matters in a random model


def test_shared_attention_site_equals_equal_qkv_masks(tiny, getkey):
    model, batch = tiny
    per_qkv = Scrubber.build(model, batch, units="edges")
    shared = Scrubber.build(model, batch, sites=edges.edge_sites(CFG, qkv=False), units="edges")
    _, repl = per_qkv.reference(batch, jax.random.key(0))
    m0 = (jax.random.uniform(getkey(), (1,)) > 0.5).astype(jnp.float32)
    m1 = (jax.random.uniform(getkey(), (6,)) > 0.5).astype(jnp.float32)
    rest = {s: jnp.ones(n) for s, n in shared.n_units.items() if ".attn." not in s}
    a = shared.logits(batch.clean, {**rest, "blocks.0.attn.in": m0, "blocks.1.attn.in": m1}, repl)
    tiled = {f"blocks.{lay}.attn.{x}.in": jnp.tile(m, 4) for lay, m in ((0, m0), (1, m1)) for x in "qkv"}
    b = per_qkv.logits(batch.clean, {**rest, **tiled}, repl)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("ablation", ["mean", "zero", "optimal"])
def test_other_ablations(tiny, ablation):
    model, batch = tiny
    scrubber = Scrubber.build(model, batch, ablation=ablation, units="edges")
    _, repl = scrubber.reference(batch, jax.random.key(0))
    assert repl[edges.WRITERS].shape == (6, 5, 11, 16)
    zeros = {s: jnp.zeros(n) for s, n in scrubber.n_units.items()}
    out = scrubber.logits(batch.clean, zeros, repl)
    if ablation == "zero":  # every writer zeroed: the reader sees only the biases
        bias = sum(b.attn.b_O + b.mlp.b_out for b in model.blocks)
        x = jnp.broadcast_to(bias, (6, 5, 16))
        np.testing.assert_allclose(out, (model.ln_final(x) @ model.W_U + model.b_U)[:, -1], atol=1e-5)
    assert bool(jnp.isfinite(out).all())


def test_clear_errors(tiny):
    model, batch = tiny
    with pytest.raises(ExplainerError, match="not a reader of the edge graph"):
        Scrubber.build(model, batch, sites=["blocks.2.mlp.in"], units="edges")
    with pytest.raises(ExplainerError, match="both as a whole"):
        Scrubber.build(model, batch, sites=["blocks.0.attn.in", "blocks.0.attn.q.in"], units="edges")
    with pytest.raises(ExplainerError, match="unknown units 'edge'"):
        Scrubber.build(model, batch, units="edge")
    with pytest.raises(ExplainerError, match="no basis and no positions"):
        Scrubber.build(model, batch, units="edges", positional=True)
    from explainer.train.config import TrainConfig

    with pytest.raises(ExplainerError, match="--units dims"):
        TrainConfig.of(units="edges", basis="pca")


def test_baselines_rank_edges():
    from explainer.baselines import baseline_frontier, rank

    folder = resolve_model("induction")
    task = resolve_task(None, folder)
    scrubber = Scrubber.build(load_model(folder), task.train_data(), units="edges")
    for method in ("variance", "attribution"):
        scores = rank(method, scrubber, task.train_data(), jax.random.key(0))
        assert {s: len(v) for s, v in scores.items()} == scrubber.n_units
    f = baseline_frontier("attribution", "induction", sizes=[3, 29], budget=1, units="edges")
    assert [r["size"] for r in f["records"]] == [3, 29]
    assert f["records"][-1]["logit_diff_recovered"] == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory, cli_here):
    out = tmp_path_factory.mktemp("edges") / "induction"
    proc = cli_here("train", "--model", "induction", "--units", "edges", "--out", out, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_induction_keeps_k_composition(induction_run, cli_here):
    """The induction head finds its previous-token head through its *key*: an edge from a layer-0
    head into a layer-1 head's k input must be kept, and the explanation must be faithful."""
    out, result = induction_run
    assert result["config"]["units"] == "edges"
    assert result["faithfulness"]["logit_diff_recovered"] >= 0.9
    show = json.loads(cli_here("show", out, "--json").stdout.strip().splitlines()[-1])
    assert any(e.startswith("a0.") and e.endswith(".k") and "->a1." in e for e in show["edges"]), show["edges"]
    assert len(show["edges"]) == result["size"] < 29


def test_edge_run_in_every_command(induction_run, tmp_path, cli_here):
    out, result = induction_run
    evaluated = json.loads(cli_here("eval", out, "--json").stdout.strip().splitlines()[-1])
    assert evaluated["units"] == "edges" and evaluated["size"] == result["size"]
    attacked = cli_here("attack", out, "--budget", "2", "--units", "edges", "--json")
    assert attacked.returncode == 0, attacked.stderr
    assert json.loads(attacked.stdout.strip().splitlines()[-1])["gap"]["kl_mean"] >= 0.0
    wrong = cli_here("attack", out, "--units", "dims")
    assert wrong.returncode != 0 and "has edges units, not dims" in wrong.stderr
    mib = json.loads(
        cli_here("export", out, "--format", "mib", "--out", tmp_path / "m.json", "--json").stdout.splitlines()[-1]
    )
    assert mib["edges_in_graph"] == result["size"]
    graph = json.loads((tmp_path / "m.json").read_text())
    assert "a0.h0->a1.h1<k>" in graph["edges"] and "input->logits" in graph["edges"]


def test_sweep_over_edges(tmp_path, cli_here):
    proc = cli_here(
        "sweep", "--model", "induction", "--units", "edges", "--sizes", "2,6", "--steps", "200",
        "--ablations", "", "--adversary", "none", "--out", tmp_path / "sw", "--json", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    frontier = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = [r["size"] for r in frontier["records"]]
    assert len(sizes) == 2 and sizes[0] <= 2 and sizes[1] <= 6, sizes
    rung = json.loads(cli_here("eval", frontier["records"][1]["run"], "--json").stdout.strip().splitlines()[-1])
    assert rung["units"] == "edges" and rung["size"] == sizes[1]


def test_optimal_constants_are_fitted_per_writer(tiny):
    """The optimal ablation fits one constant per writer, position and dimension, and lowers the KL."""
    from explainer.metrics import kl_divergence
    from explainer.optimal import fit_constants

    model, batch = tiny
    scrubber = Scrubber.build(model, batch, ablation="optimal", units="edges")
    zeros = {s: np.zeros(n, np.float32) for s, n in scrubber.n_units.items()}
    [fitted] = fit_constants(scrubber, batch, [zeros], steps=200, lr=0.005, batch_size=6)
    assert fitted[edges.WRITERS].shape == (5, 11, 16)
    full = model(batch.clean)[:, -1]
    keep = {s: jnp.asarray(v) for s, v in zeros.items()}

    def kl(constants):
        repl = {edges.WRITERS: jnp.broadcast_to(constants, (6, *constants.shape))}
        return float(kl_divergence(full, scrubber.logits(batch.clean, keep, repl)).mean())

    assert kl(fitted[edges.WRITERS]) < kl(scrubber.means[edges.WRITERS])


def test_optimal_ablation_grades_edge_masks(tiny):
    """Grading edge masks under the optimal ablation (a default of the sweep) measures them: the
    fitted constants are keyed by the writers, not by the reader sites."""
    from explainer.frontier.grade import ablation_frontiers

    model, batch = tiny
    scrubber = Scrubber.build(model, batch, units="edges")
    masks = [{s: np.ones(n, np.float32) for s, n in scrubber.n_units.items()}]
    masks.append({s: np.zeros(n, np.float32) for s, n in scrubber.n_units.items()})
    out = ablation_frontiers(scrubber, batch, batch, masks, ["optimal"])
    full, empty = out["optimal"]["records"]
    assert abs(full["kl_mean"]) < 1e-5 and full["size"] == 110
    assert empty["kl_mean"] > 0 and empty["size"] == 0


def _program(layers: int, keep_sites, equations, last: bool) -> int:
    cfg = ModelConfig(n_layers=layers, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=4)
    model = init_random(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 3), int)
    sites = edges.edge_sites(cfg, qkv=keep_sites == "qkv")
    keep = {s: jnp.ones(n) for s, n in edges.edge_units(cfg, sites).items()}
    _, writers = edges.run(model, tokens, capture=True)

    def loss(keep):
        return edges.run(model, tokens, keep, {edges.WRITERS: writers}, last=last)[0].sum()

    return equations(jax.make_jaxpr(jax.grad(loss))(keep).jaxpr)


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("keep_sites", ["qkv", "shared"])
def test_the_edge_program_does_not_grow_with_depth(keep_sites, last, equations, monkeypatch):
    """Where the edge forward loops (off the CPU), it and its gradient trace to the same program at
    ``SCAN_LAYERS`` layers (one more under ``last``, whose final block runs on its own) and at 12:
    blocks of one shape run as one loop body, and every reader's weights come from one gather of
    the masks."""
    monkeypatch.setattr("explainer.models.transformer.LOOP_ON_CPU", True)  # as off the CPU
    shallow = _program(edges.SCAN_LAYERS + last, keep_sites, equations, last)
    assert shallow == _program(12, keep_sites, equations, last)


FAMILIES = {  # block kinds the final block may be: plain, parallel (NeoX), grouped keys and values, post-norms
    "gpt2": {},
    "parallel": {"parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 2},
    "gqa": {"n_key_value_heads": 2, "normalization_type": "RMS", "gated_mlp": True, "act_fn": "silu"},
    "post-norms": {"normalization_type": "RMS", "use_normalization_before_and_after": True},
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("loop", [False, True])
def test_the_last_position_alone_is_the_last_position_of_every_one(loop, family, monkeypatch):
    """``last=True`` (what the scrubber reads) gives the last position of the logits at every
    position, and the same mask gradients, whether the layers run one by one or as a loop with the
    final block on its own, for each kind of block, on left-padded prompts."""
    monkeypatch.setattr("explainer.models.transformer.LOOP_ON_CPU", loop)
    cfg = ModelConfig(
        n_layers=edges.SCAN_LAYERS + 1, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=11, n_ctx=8,
        **FAMILIES[family],
    )  # fmt: skip
    model = init_random(cfg, jax.random.key(0))
    tokens, other = (jax.random.randint(jax.random.key(i), (3, 5), 1, 11) for i in (1, 2))
    tokens = tokens.at[0, :2].set(PAD)  # a prompt of three tokens, padded on the left
    _, writers = edges.run(model, other, capture=True)
    sizes = edges.edge_units(cfg, edges.edge_sites(cfg))
    keys = jax.random.split(jax.random.key(3), len(sizes))
    keep = {s: jax.random.uniform(k, (n,)) for (s, n), k in zip(sizes.items(), keys, strict=True)}

    def loss(keep, last):
        logits = edges.run(model, tokens, keep, {edges.WRITERS: writers}, last=last)[0]
        assert logits.shape[1] == (1 if last else tokens.shape[1])
        return (logits[:, -1] ** 2).mean()

    every = jax.jit(jax.value_and_grad(lambda k: loss(k, False)))(keep)
    alone = jax.jit(jax.value_and_grad(lambda k: loss(k, True)))(keep)
    np.testing.assert_allclose(alone[0], every[0], rtol=1e-5)
    for site in keep:
        np.testing.assert_allclose(alone[1][site], every[1][site], rtol=1e-4, atol=1e-6)


def test_a_loop_of_layers_computes_what_layers_one_by_one_do(monkeypatch):
    """The looped edge forward (every writer read, the ones not upstream weighted zero) equals the
    forward with each layer on its own, under random masks, and its mask gradients too."""
    cfg = ModelConfig(n_layers=edges.SCAN_LAYERS, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=11, n_ctx=8)
    model = init_random(cfg, jax.random.key(0))
    tokens, other = (jax.random.randint(jax.random.key(i), (3, 5), 0, 11) for i in (1, 2))
    _, writers = edges.run(model, other, capture=True)
    sizes = edges.edge_units(cfg, edges.edge_sites(cfg))
    keys = jax.random.split(jax.random.key(3), len(sizes))
    keep = {s: jax.random.uniform(k, (n,)) for (s, n), k in zip(sizes.items(), keys, strict=True)}

    def loss(keep):
        return (edges.run(model, tokens, keep, {edges.WRITERS: writers})[0] ** 2).mean()

    monkeypatch.setattr("explainer.models.transformer.LOOP_ON_CPU", True)  # as off the CPU
    looped = jax.jit(jax.value_and_grad(loss))(keep)  # traced anew: each reads SCAN_LAYERS as it is
    monkeypatch.setattr(edges, "SCAN_LAYERS", cfg.n_layers + 1)
    one_by_one = jax.jit(jax.value_and_grad(loss))(keep)
    np.testing.assert_allclose(looped[0], one_by_one[0], rtol=1e-5)
    for site in keep:
        np.testing.assert_allclose(looped[1][site], one_by_one[1][site], rtol=1e-4, atol=1e-6)
