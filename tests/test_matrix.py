"""Every command on every kind of unit: each works, or refuses at once with a clear error.

Commands (train, eval under each ablation, attack, sweep with every default ablation, export, show)
× units (dimensions, edges, a learned basis, a rewritten MLP), in-process on ``planted-joint``
with few steps: what is checked is that each command runs end to end and keeps its JSON contract,
not what it finds.
"""

import json

import pytest

from explainer.cli import main
from explainer.scrub import ABLATIONS

UNITS = {
    "dims": [],
    "edges": ["--units", "edges"],
    "learned": ["--basis", "learned"],
    "rewrites": ["--rewrite", "blocks.0.mlp=linear"],
}
FEW = ["--steps", "40", "--no-progress", "--seed", "0"]


def run_cli(capsys, *args: str) -> tuple[int, dict | None, str]:
    """``explainer ARGS --json`` in this process: exit status, the JSON result (if any), stderr."""
    try:
        main([*map(str, args), "--json"])
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 and lines else None), err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Where each kind of unit's run folder goes."""
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("units", list(UNITS))
def test_every_command_runs_on_each_kind_of_unit(capsys, runs, units):
    run = runs / units
    code, trained, err = run_cli(capsys, "train", "--model", "planted-joint", *UNITS[units], *FEW, "--out", run)
    assert code == 0, err
    assert {"run", "size", "kept", "faithfulness", "warnings"} <= set(trained)
    for ablation in ABLATIONS:
        code, result, err = run_cli(capsys, "eval", run, "--ablation", ablation)
        assert code == 0, (ablation, err)
        assert result["ablation"] == ablation and result["faithfulness"]["kl_mean"] >= -1e-6
        assert isinstance(result["warnings"], list)
    excluded = trained["total_units"] - trained["size"]
    code, attacked, err = run_cli(capsys, "attack", run, "--budget", "1", "--method", "greedy", "--no-progress")
    if excluded == 0:
        assert code == 2 and "nothing to re-include" in err
    else:
        assert code == 0, err
        assert attacked["verdict"] in ("robust", "fragile") and "reincluded_names" in attacked
    code, shown, err = run_cli(capsys, "show", run)
    assert code == 0, err
    code, exported, err = run_cli(capsys, "export", run, "--format", "json", "--out", runs / f"{units}-units.json")
    assert code == 0, err
    code, exported, err = run_cli(capsys, "export", run, "--format", "mib", "--out", runs / f"{units}-mib.json")
    if units == "edges":
        assert code == 0, err
        assert exported["edges"] > 0
    else:  # works, or refuses with the fix
        assert code == 0 or (code == 2 and err.startswith("error:")), err


SWEEP_CONFIG = {"learned": 'basis = "learned"\n', "rewrites": 'rewrites = ["blocks.0.mlp=linear"]\n'}


@pytest.mark.parametrize("units", list(UNITS))
def test_the_sweep_runs_on_each_kind_of_unit_with_every_default_ablation(capsys, tmp_path, units):
    """The sweep's default ablations include ``optimal`` (grading edges under it used to crash after
    training). A sweep cannot carry a learned basis or a rewrite: it refuses them before training."""
    args = ["sweep", "--model", "planted-joint", "--sizes", "2", *FEW, "--out", tmp_path / "sweep"]
    if units in SWEEP_CONFIG:
        (tmp_path / "settings.toml").write_text(SWEEP_CONFIG[units])
        code, _, err = run_cli(capsys, *args, "--config", tmp_path / "settings.toml")
        assert code == 2 and "error:" in err and "explainer train" in err, err
        assert not (tmp_path / "sweep").exists()
        return
    code, result, err = run_cli(capsys, *args, *UNITS[units])
    assert code == 0, err
    assert set(result["ablations"]) == set(ABLATIONS)
    [record] = result["records"]
    assert record["target"] == 2 and record["run"].endswith(f"size-{record['size']}-target-2")
    assert isinstance(result["warnings"], list)
    code, shown, err = run_cli(capsys, "show", tmp_path / "sweep", "--png", tmp_path / "frontier.png")
    assert code == 0, err
    assert shown["records"] == result["records"] and (tmp_path / "frontier.png").stat().st_size > 0
