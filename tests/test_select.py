"""Selection with an adversary, on planted models the zoo does not ship.

Each model hides a cancelling pair of dimensions at the unembedding among a copy pathway: dropping
the pair together costs no KL, re-including one of it moves the logits. Training with the adversary
keeps the pair; the sweep's selection must not trade that robust set for the smaller fragile one
(it ranked sets by KL alone and reported the fragile set at every rung).
"""

import numpy as np
import pytest

from explainer.frontier.sweep import sweep
from explainer.models.native import from_state_dict, save_model, write_json
from explainer.tasks import planted as planted_tasks
from explainer.tasks.prompts import prompts_json
from explainer.zoo import planted

KL_BUDGET = 0.01


def cancelling_variant(heads: int, pair: tuple[int, int], pair_scale: float, seed: int):
    """Dim 0 holds the first token's class; head ``h`` copies it into dim ``1 + 2h``, which the
    unembedding reads; dims ``pair`` carry ``±3 × class`` and cancel at the logits. Truth:
    ``attn.in: [0]``, ``unembed.in``: the copies and the pair."""
    cfg = planted._config(n_heads=heads, n_ctx=4, attn_only=True)
    w = planted._zeros(cfg)
    classes = planted.token_class(np.arange(8))
    w["embed.W_E"][:8, 0] = classes
    w["pos_embed.W_pos"][0, 2] = 1.0
    copies = [1 + 2 * h for h in range(heads)]
    planted._distractors(w, [d for d in range(4, 10) if d not in pair and d not in copies], seed=seed)
    w["embed.W_E"][:8, pair[0]] = 3.0 * classes
    w["embed.W_E"][:8, pair[1]] = -3.0 * classes
    for h, dim in enumerate(copies):
        planted._copy_head(w, head=h, read=0, write=dim, key_dim=2)
        planted._answer_readout(w, dim, scale=planted.UNEMBED / heads)
    for dim in pair:
        planted._answer_readout(w, dim, scale=pair_scale)
    truth = {"blocks.0.attn.in": [0], "unembed.in": sorted([*copies, *pair])}
    return from_state_dict(cfg, w, source="held-out variant"), truth


VARIANTS = {
    "two-copies": dict(heads=2, pair=(6, 7), pair_scale=0.3, seed=5),
    "one-copy": dict(heads=1, pair=(4, 9), pair_scale=0.4, seed=7),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_rung_from_the_robust_size_up_is_robust_with_the_adversary(tmp_path, name):
    model, truth = cancelling_variant(**VARIANTS[name])
    folder = tmp_path / name
    save_model(model, folder)
    write_json(folder / "prompts.json", prompts_json(planted_tasks.first_class_prompts()))
    robust = sum(len(u) for u in truth.values())
    sizes = [robust - 2, robust, robust + 1]
    result = sweep(folder, sizes=sizes, adversary="learned", ablations=(), budget=2, progress=False)
    by_target = {r["target"]: r for r in result["records"]}
    assert set(by_target) == set(sizes)
    for target in (robust, robust + 1):
        r = by_target[target]
        assert r["size"] >= robust, (target, r["kept"])
        assert r["kl_mean"] <= KL_BUDGET and r["gap"] <= KL_BUDGET, (target, r["kept"], r["gap"])
        assert set(truth["unembed.in"]) <= set(r["kept"].get("unembed.in", []))
