"""Typed settings: groups, flat construction, refused combinations, TOML tables and old files, records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from explainer.errors import ExplainerError
from explainer.train.config import (
    Dims,
    Edges,
    KLBudget,
    Lambda,
    TargetSize,
    TrainConfig,
    flat_names,
    setting_help,
)
from explainer.train.config_files import from_dict, load_config, to_toml


def test_settings_are_a_few_groups():
    config = TrainConfig()
    assert len(dataclasses.fields(TrainConfig)) <= 12
    assert config.optimiser.steps == 1500 and config.runtime.checkpoint_every == 250
    assert config.penalty == KLBudget(0.01) and config.units == Dims() and not config.finishing.trim
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"], field.name
    for name in flat_names():
        assert setting_help(name), name


def test_flat_construction_places_each_setting_in_its_group():
    config = TrainConfig.of(steps=300, lam=0.05, basis="pca", trim=True, remat=True, ablation="mean")
    assert config.optimiser.steps == 300 and config.penalty == Lambda(0.05)
    assert config.units == Dims(basis="pca") and config.finishing.trim and config.runtime.remat
    assert config.ablation == "mean"
    assert TrainConfig.of(units="edges", sites=["unembed.in"]).units == Edges(sites=("unembed.in",))
    assert TrainConfig.of(target_size=4).penalty == TargetSize(4)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ExplainerError, match="unknown setting 'stpes'; did you mean 'steps'"):
        TrainConfig.of(stpes=3)
    with pytest.raises(ExplainerError, match="did you mean 'kl_budget'"):
        TrainConfig().replace(kl_budgte=0.1)


@pytest.mark.parametrize(
    "settings, fix",
    [
        ({"lam": 0.1, "target_size": 3}, "not both: give one of them"),
        ({"kl_budget": 0.02, "lam": 0.1}, "not both: give one of them"),
        ({"units": "edges", "basis": "pca"}, "use --units dims"),
        ({"units": "edges", "rewrites": ["blocks.0.mlp=linear"]}, "use --units dims"),
    ],
)
def test_illegal_combinations_are_refused_with_the_fix(settings, fix):
    with pytest.raises(ExplainerError, match=fix):
        TrainConfig.of(**settings)


def test_each_group_checks_itself():
    with pytest.raises((ExplainerError, TypeError), match="'steps' must be an integer|typechecking"):
        dataclasses.replace(TrainConfig().optimiser, steps=1.5)
    with pytest.raises(ExplainerError, match="'lam' must be a finite number >= 0"):
        Lambda(-1.0)
    with pytest.raises(
        (ExplainerError, TypeError), match="'penalty' must be a KLBudget or Lambda or TargetSize|typechecking"
    ):
        TrainConfig(penalty=0.1)


def test_replace_switches_the_penalty_and_the_units():
    config = TrainConfig.of(lam=0.1, steps=200)
    assert config.replace(target_size=3).penalty == TargetSize(3)
    assert config.replace(kl_budget=0.02).penalty == KLBudget(0.02)
    assert config.replace(steps=None).optimiser.steps == 200  # None: not given
    assert TrainConfig.of(units="edges").replace(units="dims").units == Dims()
    with pytest.raises(ExplainerError, match="use --units dims"):
        TrainConfig.of(basis="pca").replace(units="edges")


def test_the_record_keeps_every_flat_key_and_loads_back():
    for config in (TrainConfig(), TrainConfig.of(lam=0.2, units="edges"), TrainConfig.of(target_size=2, seed=3)):
        record = json.loads(json.dumps(config.to_json()))
        assert list(record) == flat_names()
        assert from_dict(record) == config


def test_an_old_run_record_loads():
    """A record written before the groups: flat, every key, kl_budget beside lam (ignored, as then)."""
    old = {
        "steps": 400, "batch_size": 64, "lr": 0.05, "ablation": "resample", "kl_budget": 0.005, "lam": 0.1,
        "target_size": None, "init_lambda": 0.1, "dual_lr": 0.005, "init_logit": -1.0, "sites": ["unembed.in"],
        "adversary_weight": 1.0, "repair": True, "trim": False, "trim_ld_floor": 0.9, "trim_refit_steps": 300,
        "open_restart": True, "close_attacks": True, "seed": 2, "checkpoint_every": 250, "devices": None,
        "remat": False, "basis": "standard", "basis_lr": 0.001, "positional": False, "units": "dims", "rewrites": None,
    }  # fmt: skip
    config = from_dict(old, source="run")
    assert config.penalty == Lambda(0.1) and config.optimiser.seed == 2 and config.units.sites == ("unembed.in",)


def test_an_old_run_folder_loads(tmp_path):
    """A run folder saved by an older version (flat config in explanation.json) loads."""
    import explainer
    from explainer.explanation import load

    run = tmp_path / "run"
    explainer.explain("planted-joint", steps=30, adversary="none", progress=False, out=run)
    data = json.loads((run / "explanation.json").read_text())
    data["config"] = {k: v for k, v in data["config"].items() if k not in ("basis_lr", "close_attacks")}
    data["config"]["kl_budget"], data["config"]["lam"] = 0.003, 0.1  # an old run with a fixed penalty
    (run / "explanation.json").write_text(json.dumps(data))
    assert load(run).config["lam"] == 0.1


def test_table_toml_loads(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'ablation = "mean"\n\n[optimiser]\nsteps = 200\n\n[penalty]\ntarget_size = 3\n\n'
        '[units]\nkind = "edges"\n\n[finishing]\nrepair = false\n\n[runtime]\nremat = true\n'
    )
    config = load_config(path)
    assert config.ablation == "mean" and config.optimiser.steps == 200 and config.penalty == TargetSize(3)
    assert config.units == Edges() and not config.finishing.repair and config.runtime.remat
    assert load_config(_written(tmp_path, to_toml(config.to_tables()))) == config


def _written(tmp_path, text):
    path = tmp_path / "again.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("[optimiser]\nlam = 0.1\n", "unknown setting 'lam' in \\[optimiser\\]; it belongs under \\[penalty\\]"),
        ("[optimiser]\nstpes = 1\n", "did you mean 'steps'"),
        ("[penalty]\nlam = 0.1\ntarget_size = 2\n", "not both"),
        ("steps = 3\n[penalty]\nlam = 0.1\n", "mixes tables"),
        ('[units]\nkind = "edges"\nbasis = "pca"\n', "use --units dims"),
        ("penalty = 0.1\n", "is a table of settings"),
    ],
)
def test_bad_table_toml_names_the_fix(tmp_path, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ExplainerError, match=message):
        load_config(path)


def test_old_flat_toml_loads_with_a_note_once(tmp_path, capsys):
    path = tmp_path / "old.toml"
    path.write_text('steps = 400\nablation = "mean"\nlam = 0.1\nunits = "edges"\n')
    config = load_config(path)
    assert config.optimiser.steps == 400 and config.penalty == Lambda(0.1) and config.units == Edges()
    note = capsys.readouterr().err
    assert "old flat layout" in note and "[optimiser]\nsteps = 400" in note and "[penalty]\nlam = 0.1" in note
    assert 'kind = "edges"' in note
    load_config(path)
    assert "old flat layout" not in capsys.readouterr().err  # once per file
    old_table = tmp_path / "train.toml"
    old_table.write_text("[train]\nsteps = 50\n")
    assert load_config(old_table).optimiser.steps == 50


def test_cli_options_come_from_the_settings():
    import typer

    from explainer.cli import app

    train = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in train.params}
    assert options["lam"].opts == ["--lambda"] and options["rewrites"].opts == ["--rewrite"]
    assert options["trim"].secondary_opts == ["--no-trim"]
    assert options["steps"].help == setting_help("steps") == "Training steps (default 1500)."
