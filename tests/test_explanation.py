import json

import numpy as np
import pytest

import explainer
from explainer.errors import ExplainerError


@pytest.fixture(scope="module")
def expl():
    return explainer.explain("planted-distractor", steps=300, progress=False)


def test_save_load_roundtrip(expl, tmp_path):
    path = expl.save(tmp_path / "run")
    again = explainer.load(path)
    assert again.kept == expl.kept and again.size == expl.size
    assert again.faithfulness == expl.faithfulness
    for site in expl.gate_logits:
        np.testing.assert_array_equal(again.gate_logits[site], expl.gate_logits[site])
    assert again.mask()["unembed.in"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert again.history["kl"] == expl.history["kl"]


def test_failed_save_leaves_nothing(expl, tmp_path, monkeypatch):
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError):
        expl.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_run(expl, tmp_path, monkeypatch):
    import safetensors.numpy

    path = expl.save(tmp_path / "run")
    before = (path / "explanation.json").read_bytes()
    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        expl.save(path, overwrite=True)
    assert (path / "explanation.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_schema_version_checks(expl, tmp_path):
    path = expl.save(tmp_path / "run")
    data = json.loads((path / "explanation.json").read_text())
    (path / "explanation.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ExplainerError, match="upgrade explainer"):
        explainer.load(path)
    (path / "explanation.json").write_text(json.dumps({**data, "schema_version": 0}))
    with pytest.raises(ExplainerError, match="retrain"):
        explainer.load(path)


def test_not_a_run(tmp_path):
    with pytest.raises(ExplainerError, match="not a run folder"):
        explainer.load(tmp_path)
    with pytest.raises(ExplainerError, match="does not exist"):
        explainer.load(tmp_path / "nope")


def test_truncated_tensors(expl, tmp_path):
    path = expl.save(tmp_path / "run")
    data = (path / "explanation.safetensors").read_bytes()
    (path / "explanation.safetensors").write_bytes(data[:20])
    with pytest.raises(ExplainerError, match="missing or corrupt"):
        explainer.load(path)


def test_summary_mentions_every_site(expl):
    text = expl.summary()
    for site in expl.n_units:
        assert site in text
    assert "KL mean" in text
