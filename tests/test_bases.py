"""Bases, position-specific masks and the illusion check."""

import json

import numpy as np
import pytest

import explainer
from explainer.api import evaluate
from explainer.bases import file_bases
from explainer.errors import ExplainerError
from explainer.illusion import check_illusions
from explainer.models import load_model
from explainer.models.native import from_state_dict, to_state_dict
from explainer.tasks import resolve_task
from explainer.zoo import load_truth, resolve_model
from explainer.zoo.rotated import write_rotated


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    """planted-distractor and planted-joint with their residual streams randomly rotated."""
    out = {}
    for name in ("planted-distractor", "planted-joint"):
        folder = tmp_path_factory.mktemp("rotated") / name
        write_rotated(name, folder, seed=0)
        out[name] = folder
    return out


def _rank(folder) -> int:
    return sum(json.loads((folder / "truth_rank.json").read_text()).values())


@pytest.mark.parametrize("name", ["planted-distractor", "planted-joint"])
def test_learned_basis_recovers_the_true_rank_where_the_standard_basis_cannot(name, rotated):
    """Without the adversary, to isolate the basis: with it, planted-joint keeps one direction
    more than its rank at the MLP (4 instead of 3)."""
    folder = rotated[name]
    standard = explainer.explain(folder, adversary="none", progress=False)
    learned = explainer.explain(folder, basis="learned", adversary="none", progress=False)
    assert learned.faithfulness["kl_mean"] <= 0.01
    assert learned.size == _rank(folder)
    assert standard.size >= 3 * _rank(folder)  # a feature in a dense direction needs many dimensions


def test_trim_refits_a_learned_basis_down_to_the_true_rank(rotated):
    """With the adversary in the loop and a short run, the rotation that trained with the gates
    leaves rotated planted-joint's trim above its rank (3); refitting the rotation to the set
    trim stops at lets it go down to the rank, within the KL budget."""
    folder = rotated["planted-joint"]
    kw = dict(basis="learned", trim=True, steps=300, progress=False)
    plain = explainer.explain(folder, trim_refit_steps=0, **kw)
    refit = explainer.explain(folder, **kw)
    assert plain.size > _rank(folder) and plain.history["refits"] == [0.0]
    assert refit.size == _rank(folder) and refit.history["refits"][0] >= 1
    assert refit.faithfulness["kl_mean"] <= 0.01


def test_learned_basis_is_saved_and_every_command_uses_it(rotated, tmp_path):
    e = explainer.explain(rotated["planted-distractor"], basis="learned", progress=False, out=tmp_path / "run")
    loaded = explainer.load(tmp_path / "run")
    assert set(loaded.bases) == set(e.n_units)
    for matrix in loaded.bases.values():
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(len(matrix)), atol=1e-5)  # still orthogonal
    again = evaluate(tmp_path / "run")
    assert again["basis"] == "learned"
    assert again["faithfulness"]["kl_mean"] == pytest.approx(e.faithfulness["kl_mean"], abs=1e-6)


def test_position_specific_masks_keep_one_position_per_reader():
    e = explainer.explain("planted-distractor", positional=True, adversary="none", progress=False)
    d, length = 10, 4
    assert e.n_units == {"blocks.0.attn.in": d * length, "unembed.in": d * length}
    # the head reads the class at position 0; the unembedding reads dim 1 at the last position
    assert e.kept == {"blocks.0.attn.in": [0], "unembed.in": [(length - 1) * d + 1]}
    assert e.faithfulness["kl_mean"] <= 0.01


def test_a_basis_file_must_be_orthogonal_and_name_real_sites(tmp_path):
    sites, d = ("blocks.0.attn.in", "unembed.in"), 10
    np.savez(tmp_path / "skew.npz", **{"unembed.in": np.ones((d, d), np.float32)})
    with pytest.raises(ExplainerError, match="not orthogonal"):
        file_bases(tmp_path / "skew.npz", sites, d)
    np.savez(tmp_path / "site.npz", **{"unembed.out": np.eye(d, dtype=np.float32)})
    with pytest.raises(ExplainerError, match="unknown sites"):
        file_bases(tmp_path / "site.npz", sites, d)
    np.savez(tmp_path / "shape.npz", **{"unembed.in": np.eye(d - 1, dtype=np.float32)})
    with pytest.raises(ExplainerError, match="shape"):
        file_bases(tmp_path / "shape.npz", sites, d)
    with pytest.raises(ExplainerError, match="unknown basis"):
        explainer.TrainConfig.of(basis="pcaa")


def _dormant_distractor():
    """planted-distractor plus a dormant direction: the unembedding also reads dim 9, which
    nothing ever writes (so it is constant on the task); dim 8 varies and nobody reads it."""
    net = load_model(resolve_model("planted-distractor"))
    w = {k: np.array(v) for k, v in to_state_dict(net).items()}
    for name in ("embed.W_E", "pos_embed.W_pos"):
        w[name][..., 9] = 0.0
    w["blocks.0.attn.W_O"][..., 9] = 0.0
    w["unembed.W_U"][9, 8] = 4.0  # dim 9 would raise answer A
    return from_state_dict(net.config, w)


def test_the_illusion_check_flags_a_direction_that_works_only_through_a_dormant_path():
    model = _dormant_distractor()
    data = resolve_task(None, resolve_model("planted-distractor")).train_data()
    d = 10
    basis = np.eye(d, dtype=np.float32)
    basis[:, 8] = np.eye(d)[8] + np.eye(d)[9]  # the illusion: disconnected (8) + dormant (9)
    basis[:, 9] = np.eye(d)[8] - np.eye(d)[9]
    basis[:, 8:] /= np.sqrt(2.0)
    kept = {"blocks.0.attn.in": [0], "unembed.in": [1, 8]}
    report = check_illusions(model, data, kept, {"unembed.in": basis})
    assert report["unembed.in"]["flagged"] == [8]
    assert report["unembed.in"]["used_share"] == pytest.approx([1.0, 0.5], abs=1e-6)
    assert report["blocks.0.attn.in"]["flagged"] == []
    # patching the illusion direction does move the answer, through dim 9 alone
    truth = load_truth(resolve_model("planted-distractor"))
    assert report["blocks.0.attn.in"]["used_share"] == [1.0] and truth["unembed.in"] == [1]


def test_eval_reports_the_illusion_check(tmp_path):
    explainer.explain("planted-distractor", steps=300, adversary="none", progress=False, out=tmp_path / "run")
    result = evaluate(tmp_path / "run")
    assert result["illusion"]["unembed.in"]["flagged"] == []
    assert result["illusion"]["unembed.in"]["mean_used_share"] == pytest.approx(1.0)
