"""The Python API on objects, refusals before work, warnings after it, and attack verdicts."""

import json
import subprocess
import sys

import pytest

import explainer
from explainer.errors import ExplainerError
from explainer.tasks import resolve_task
from explainer.tasks.prompts import prompts_json
from explainer.verdicts import attack_verdict, faithfulness_warnings, size_warnings
from explainer.zoo import resolve_model


def cli(*args: str) -> subprocess.CompletedProcess:
    """The console command as a user runs it: stderr is a pipe, not a terminal."""
    code = "import sys; from explainer.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def test_a_target_size_at_or_above_the_units_exits_2_before_training(tmp_path, cli_here):
    proc = cli_here("train", "--model", "planted-joint", "--target-size", "1000", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "target size 1000 is not below" in proc.stderr and "below 30" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_over_its_kl_budget_warns_in_its_json(tmp_path, cli_here):
    """One step from mostly closed gates, with nothing after training to add units back: the
    explanation keeps nothing and misses its budget, which the result says."""
    config = tmp_path / "short.toml"
    config.write_text("steps = 1\nrepair = false\nopen_restart = false\n")
    proc = cli_here(
        "train", "--model", "planted-distractor", "--config", str(config), "--out", str(tmp_path / "run"), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["faithfulness"]["kl_mean"] > 0.01
    assert any("over the KL budget" in w for w in result["warnings"]), result["warnings"]
    assert "warning: held-out KL mean" in proc.stderr
    saved = json.loads((tmp_path / "run" / "explanation.json").read_text())
    assert saved["warnings"] == result["warnings"]
    evaluated = json.loads(cli_here("eval", str(tmp_path / "run"), "--json").stdout.strip().splitlines()[-1])
    assert any("over the KL budget" in w for w in evaluated["warnings"])


def test_warnings_name_a_weak_full_model_and_a_ratio_above_one():
    weak = faithfulness_warnings({"kl_mean": 0.0, "logit_diff_full": 0.012, "accuracy_full": 0.6}, {}, 1)
    assert len(weak) == 1 and "barely does this task" in weak[0]
    above = faithfulness_warnings({"kl_mean": 0.0, "logit_diff_full": 3.0, "logit_diff_recovered": 1.51}, {}, 1)
    assert len(above) == 1 and "above 1" in above[0]
    fine = faithfulness_warnings(
        {"kl_mean": 0.004, "logit_diff_full": 3.0, "logit_diff_recovered": 1.0, "accuracy_full": 1.0},
        {"kl_budget": 0.01, "lam": None, "target_size": None},
        1,
    )
    assert fine == []
    assert "--basis learned --trim" in size_warnings(86, 96, "dims", "standard")[0]
    assert size_warnings(4, 96, "dims", "standard") == []


def test_attack_verdicts():
    assert attack_verdict(0.001, 0.01, 2, "nothing")["verdict"] == "robust"
    fragile = attack_verdict(0.5, 0.01, 1, "unembed.in:3")
    assert fragile["verdict"] == "fragile" and "re-including unembed.in:3 moves KL by 0.5" in fragile["verdict_text"]


@pytest.fixture(scope="module")
def joint_prompts():
    return prompts_json(resolve_task(None, resolve_model("planted-joint")).batch)["prompts"]


def test_the_api_takes_a_loaded_model_and_prompt_dicts(tmp_path, joint_prompts):
    model = explainer.load_model("planted-joint")
    e = explainer.explain(model, joint_prompts, steps=300, progress=False)
    assert e.kept == {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]}
    assert e.task["source"] == "inline" and e.warnings == []
    again = e.evaluate()
    assert again["faithfulness"]["kl_mean"] == pytest.approx(e.faithfulness["kl_mean"], abs=1e-6)
    assert e.evaluate(ablation="mean")["ablation"] == "mean"
    attacked = e.attack(budget=1)
    assert attacked["verdict"] == "robust" and set(attacked) >= {"gap", "reincluded", "reincluded_names", "budget"}
    run = e.save(tmp_path / "run")  # the model came from load_model, so the run knows its folder
    loaded = explainer.load(run)
    with pytest.raises(ExplainerError, match="prompts given in Python"):
        loaded.evaluate()
    assert loaded.evaluate(task={"prompts": joint_prompts})["size"] == e.size


def test_a_fragile_explanation_is_named_fragile_with_the_unit_it_misses():
    e = explainer.explain("planted-distractor", target_size=1, steps=300, progress=False)
    result = e.attack(budget=1)
    assert result["verdict"] == "fragile" and result["gap"]["kl_mean"] > 0.01
    assert result["reincluded_names"] and all(":" in n for n in result["reincluded_names"])
    assert result["reincluded_names"][0] in result["verdict_text"]
    with pytest.raises(ExplainerError, match="excludes only"):
        e.attack(budget=e.total_units)


def test_bad_api_arguments_get_clear_errors():
    with pytest.raises(ExplainerError, match="not int"):
        explainer.explain(3, progress=False)
    with pytest.raises(ExplainerError, match="not float"):
        explainer.explain("planted-joint", 0.5, progress=False)
    with pytest.raises(ExplainerError, match="must name its model's folder"):
        from explainer.models import load_model

        explainer.explain(load_model(resolve_model("planted-joint")), out="nowhere", progress=False)


def test_progress_is_printed_as_lines_when_stderr_is_not_a_terminal(tmp_path):
    proc = cli("train", "--model", "planted-distractor", "--steps", "60", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "training 60/60" in proc.stderr
    assert "evaluate ..." in proc.stderr and "evaluate done [" in proc.stderr  # every phase says it runs
