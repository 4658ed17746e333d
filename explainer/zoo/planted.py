"""Planted models: hand-weighted transformers whose correct explanation is known exactly.

Built by code, no training. Each has no LayerNorm (LayerNorm would couple every dimension), a
small vocabulary, and prompts whose counterfactual changes exactly the information that matters.
Token ids: 0-7 are content tokens, 8 and 9 are the answers ``A`` and ``B``; the tasks are in
:mod:`explainer.tasks.planted`.

- ``planted-distractor`` (task ``first-class``): the answer is the class of the first token. Head 0
  attends to position 0 and copies the class (dim 0) into dim 1, which the unembedding reads.
  Dims 4-9 are distractors: they vary from token to token but no reader that matters uses them;
  head 1 even reads dim 4, but writes it into dim 5, which nothing reads. Truth:
  ``attn.in: [0]``, ``unembed.in: [1]``.
- ``planted-cancel`` (task ``first-class``): the same pathway, plus a cancellation pair: every token
  writes ``+3c`` to dim 6 and ``-3c`` to dim 7 and the unembedding reads both with equal weight,
  so their contributions cancel on every input. Dropping both looks faithful; re-including one
  is not. Truth: ``attn.in: [0]``, ``unembed.in: [1, 6, 7]``.
- ``planted-joint`` (task ``xor-class``): prompts ``[a-token, b-token]``; the answer is ``A`` when
  the two classes agree. Attention moves ``a`` (dim 0) into dim 2; a ReLU MLP reads ``a`` (dim 2)
  and ``b`` (dim 1) and writes their XNOR into dim 3. Each of ``a`` and ``b`` matters only jointly
  with the other, through the nonlinearity. Truth: ``attn.in: [0]``, ``mlp.in: [1, 2]``,
  ``unembed.in: [3]``.

Ground truth is stated for the default ablation, resample with the prompts' own counterfactuals.
``python -m explainer.zoo.planted`` rewrites the shipped folders (deterministically).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explainer.models.config import ModelConfig
from explainer.models.native import expected_shapes, from_state_dict, save_model, write_json
from explainer.models.transformer import Transformer
from explainer.tasks.planted import ANSWER_A, ANSWER_B, TASKS, pair_class, token_class
from explainer.tasks.prompts import prompts_json

D_MODEL = 10
QUERY = 7.0  # attention score to the attended position is QUERY**2 / sqrt(d_head) ~ 35
UNEMBED = 4.0  # logit difference between the answers: 2 * UNEMBED = 8 nats


def _config(**fields) -> ModelConfig:
    """A planted model's config: one layer, no LayerNorm (it would couple every dimension), relu."""
    base = dict(n_layers=1, d_model=D_MODEL, d_head=2, d_vocab=10, normalization_type=None, act_fn="relu")
    return ModelConfig(**{**base, **fields})


def _zeros(cfg: ModelConfig) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(cfg).items()}


def _distractors(w: dict[str, np.ndarray], dims: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w["embed.W_E"][:8, dims] = rng.normal(size=(8, len(dims))).astype(np.float32)


def _copy_head(w: dict[str, np.ndarray], head: int, read: int, write: int, key_dim: int) -> None:
    """Head ``head`` attends to the position marked in ``key_dim`` and copies dim ``read`` to ``write``."""
    a = "blocks.0.attn."
    w[a + "b_Q"][head, 0] = QUERY
    w[a + "W_K"][head, key_dim, 0] = QUERY
    w[a + "W_V"][head, read, 0] = 1.0
    w[a + "W_O"][head, 0, write] = 1.0


def _answer_readout(w: dict[str, np.ndarray], dim: int, scale: float = UNEMBED) -> None:
    w["unembed.W_U"][dim, ANSWER_A] += scale
    w["unembed.W_U"][dim, ANSWER_B] -= scale


def build_distractor() -> Transformer:
    cfg = _config(n_heads=2, n_ctx=4, attn_only=True)
    w = _zeros(cfg)
    w["embed.W_E"][:8, 0] = token_class(np.arange(8))
    w["pos_embed.W_pos"][0, 2] = 1.0
    w["pos_embed.W_pos"][:, 3] = 1.0
    _distractors(w, [4, 5, 6, 7, 8, 9], seed=1)
    _copy_head(w, head=0, read=0, write=1, key_dim=2)
    _copy_head(w, head=1, read=4, write=5, key_dim=2)  # reads a distractor, writes where nobody reads
    _answer_readout(w, 1)
    return from_state_dict(cfg, w, source="planted-distractor")


def build_cancel() -> Transformer:
    cfg = _config(n_heads=1, n_ctx=4, attn_only=True)
    w = _zeros(cfg)
    w["embed.W_E"][:8, 0] = token_class(np.arange(8))
    w["pos_embed.W_pos"][0, 2] = 1.0
    _distractors(w, [4, 5, 8, 9], seed=2)
    w["embed.W_E"][:8, 6] = 3.0 * token_class(np.arange(8))
    w["embed.W_E"][:8, 7] = -3.0 * token_class(np.arange(8))
    _copy_head(w, head=0, read=0, write=1, key_dim=2)
    _answer_readout(w, 1)
    _answer_readout(w, 6, scale=2.0)
    _answer_readout(w, 7, scale=2.0)
    return from_state_dict(cfg, w, source="planted-cancel")


def build_joint() -> Transformer:
    cfg = _config(n_heads=1, d_mlp=4, n_ctx=2, attn_only=False)
    w = _zeros(cfg)
    w["embed.W_E"][:4, 0] = pair_class(np.arange(4))  # a-tokens 0-3 write their class to dim 0
    w["embed.W_E"][4:8, 1] = pair_class(np.arange(4, 8))  # b-tokens 4-7 write theirs to dim 1
    w["pos_embed.W_pos"][0, 4] = 1.0
    _distractors(w, [5, 6, 7, 8, 9], seed=3)
    _copy_head(w, head=0, read=0, write=2, key_dim=4)
    m = "blocks.0.mlp."
    w[m + "W_in"][[1, 2], 0] = 1.0  # relu(a + b): 2 when both are +1
    w[m + "W_in"][[1, 2], 1] = -1.0  # relu(-a - b): 2 when both are -1
    w[m + "W_out"][[0, 1], 3] = 1.0
    w[m + "b_out"][3] = -1.0  # dim 3 = +1 when a == b, -1 otherwise
    w[m + "W_in"][5, 2] = 1.0  # a neuron that reads a distractor ...
    w[m + "W_out"][2, 9] = 1.0  # ... and writes where nobody reads
    _answer_readout(w, 3)
    return from_state_dict(cfg, w, source="planted-joint")


PLANTED = {
    "planted-distractor": (
        build_distractor,
        "first-class",
        {"blocks.0.attn.in": [0], "unembed.in": [1]},
        "a clean copy pathway (dim 0 -> head 0 -> dim 1 -> logits) among distractor dimensions",
    ),
    "planted-cancel": (
        build_cancel,
        "first-class",
        {"blocks.0.attn.in": [0], "unembed.in": [1, 6, 7]},
        "the distractor pathway plus a pair of dimensions (6, 7) that cancel exactly at the logits",
    ),
    "planted-joint": (
        build_joint,
        "xor-class",
        {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]},
        "two classes that matter only jointly, through a ReLU MLP computing their XNOR",
    ),
}


def write_planted(name: str, folder: Path) -> Path:
    """Build planted model ``name`` and write its folder (config, weights, truth, prompts, card)."""
    from explainer.metrics import accuracy

    build, task, truth, description = PLANTED[name]
    model = build()
    prompts = TASKS[task]()
    save_model(model, folder)
    write_json(folder / "truth.json", truth)
    write_json(folder / "prompts.json", prompts_json(prompts))
    logits = model(prompts.clean)[:, -1]
    write_json(
        folder / "card.json",
        {
            "name": name,
            "task": task,
            "kind": "planted",
            "accuracy": float(accuracy(logits, prompts.answers, prompts.wrong_answers)),
            "description": description,
        },
    )
    return folder


def main() -> None:
    from explainer.zoo.catalog import ZOO_DIR

    for name in PLANTED:
        print("wrote", write_planted(name, ZOO_DIR / name))


if __name__ == "__main__":
    main()
