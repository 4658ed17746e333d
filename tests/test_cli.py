"""The command line as a user runs it: its stdout, stderr and exit code. The first run and the usage
errors go through a subprocess; the other commands run the console script's ``main`` in this
process (``cli_here``), which answers the same and skips a fresh interpreter per call."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from explainer.zoo import resolve_model

FAST = ["--steps", "400", "--no-progress"]
ANY_RUN = ["--steps", "50", "--adversary", "none", "--no-progress"]  # where what the run found does not matter


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "explainer.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def last_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "joint"
    result = last_json(cli("train", "--model", "planted-joint", "--seed", "0", "--out", out, "--json", "--no-progress"))
    return out, result


def test_zoo_json_contract():
    result = last_json(cli("zoo", "--json"))
    names = {m["name"] for m in result["models"]}
    assert {"planted-distractor", "planted-cancel", "planted-joint"} <= names
    for m in result["models"]:
        assert {"name", "task", "accuracy", "ground_truth"} <= set(m)
        card = json.loads((Path(m["path"]) / "card.json").read_text())
        assert m["accuracy"] >= card.get("ship_threshold", 1.0)  # the language model ships tasks above 0.8
    assert "planted-joint" in cli("zoo").stdout


def test_train_json_contract(run):
    out, result = run
    assert {"run", "size", "kept", "faithfulness"} <= set(result)
    assert {"kl_mean", "kl_p99", "logit_diff_recovered", "accuracy"} <= set(result["faithfulness"])
    assert result["run"] == str(out)
    assert result["kept"] == {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]}
    assert result["size"] == 4
    assert (out / "explanation.json").is_file() and (out / "explanation.safetensors").is_file()
    saved = json.loads((out / "explanation.json").read_text())
    assert saved["schema_version"] == 1 and saved["seed"] == 0 and "jax" in saved["versions"]
    assert len(saved["model"]["sha256"]) == 64


def test_eval_and_show(run, tmp_path, cli_here):
    out, _ = run
    result = last_json(cli_here("eval", out, "--json", "--truth"))
    assert result["faithfulness"]["kl_mean"] <= 0.01
    assert result["truth"]["f1"] == 1.0
    mean = last_json(cli_here("eval", out, "--json", "--ablation", "mean"))
    assert mean["ablation"] == "mean"
    shown = last_json(cli_here("show", out, "--json", "--png", tmp_path / "m.png"))
    assert Path(shown["png"]).stat().st_size > 1000
    text = cli_here("show", out, "--png", tmp_path / "m2.png")
    assert "blocks.0.mlp.in" in text.stdout and text.returncode == 0


def test_existing_run_is_not_replaced_without_overwrite(run, cli_here):
    out, _ = run
    before = folder_digest(out)
    proc = cli_here("train", "--model", "planted-joint", "--out", out, *FAST)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert folder_digest(out) == before


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path, cli_here):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    proc = cli_here("train", "--model", "planted-joint", "--out", tmp_path / "notes", "--overwrite", *FAST)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_overwrite_replaces_a_run(tmp_path, cli_here):
    out = tmp_path / "r"
    last_json(cli_here("train", "--model", "planted-distractor", "--out", out, "--json", *ANY_RUN))
    again = last_json(
        cli_here(
            "train", "--model", "planted-distractor", "--out", out, "--overwrite", "--seed", "1", "--json", *ANY_RUN
        )
    )
    assert json.loads((out / "explanation.json").read_text())["seed"] == 1 == again["config"]["seed"]
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temp folders left behind


def test_prompts_file_and_config_file(tmp_path, cli_here):
    prompts = tmp_path / "p.json"
    shutil.copy(resolve_model("planted-distractor") / "prompts.json", prompts)
    config = tmp_path / "c.toml"
    config.write_text('steps = 400\nablation = "resample"\n')
    result = last_json(
        cli_here(
            "train",
            "--model",
            "planted-distractor",
            "--task",
            prompts,
            "--config",
            config,
            "--out",
            tmp_path / "r",
            "--json",
            "--no-progress",
        )
    )
    assert result["config"]["steps"] == 400 and result["task"]["source"] == "file"
    assert last_json(cli_here("eval", tmp_path / "r", "--json"))["task"] == str(prompts)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "planted-jiont"], "did you mean 'planted-joint'"),
        (["train", "--model", "planted-joint", "--ablation", "resampel"], "did you mean 'resample'"),
        (["train", "--model", "planted-joint", "--lambda", "0.1", "--target-size", "3"], "not both"),
        (["train", "--model", "planted-joint", "--task", "nope.json"], "does not exist"),
        (["eval", "nowhere"], "does not exist"),
        (["show", "."], "not a run folder"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message, tmp_path, cli_here):
    proc = cli_here(*args, "--out", tmp_path / "r") if args[0] == "train" else cli_here(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_bad_config_file(tmp_path, cli_here):
    config = tmp_path / "c.toml"
    config.write_text("stpes = 10\n")
    proc = cli_here("train", "--model", "planted-joint", "--config", config, "--out", tmp_path / "r")
    assert proc.returncode == 2 and "unknown setting 'stpes'; did you mean 'steps'" in proc.stderr


def test_bad_prompts_leave_nothing_behind(tmp_path, cli_here):
    prompts = tmp_path / "p.json"
    prompts.write_text(
        json.dumps(
            {
                "prompts": [
                    {"clean": [1, 2], "answers": [8], "wrong_answers": [9]},
                    {"clean": [1, 2], "answers": [8, 7], "wrong_answers": [9]},
                ]
            }
        )
    )
    proc = cli_here("train", "--model", "planted-joint", "--task", prompts, "--out", tmp_path / "r", *FAST)
    assert proc.returncode == 2 and "unequal 'answers' lengths" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_changed_weights_are_detected(tmp_path, cli_here):
    model = tmp_path / "model"
    shutil.copytree(resolve_model("planted-distractor"), model)
    last_json(cli_here("train", "--model", model, "--out", tmp_path / "r", "--json", *ANY_RUN))
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float32 of the last tensor becomes 1.0
    (model / "model.safetensors").write_bytes(bytes(data))
    for command in ("eval", "attack"):
        proc = cli_here(command, tmp_path / "r")
        assert proc.returncode == 2 and "changed since" in proc.stderr


def test_attack_json_contract(run, cli_here):
    out, _ = run
    result = last_json(cli_here("attack", out, "--budget", "1", "--method", "all", "--json"))
    assert {"budget", "method", "reincluded", "gap", "accuracy_change", "logit_diff_change"} <= set(result)
    assert {"kl_mean", "kl_max"} <= set(result["gap"])
    assert result["gap"]["kl_mean"] < 1e-4  # the planted truth leaves nothing to find
    assert {m["method"] for m in result["methods"]} >= {"greedy", "random", "gradient", "exhaustive"}
    phases = ["prepare", "reference", *(m["method"] for m in result["methods"])]
    assert list(result["timings"]) == [*phases, "xla_compile"]  # in order, then the compiles within them
    assert 0 <= result["timings"]["xla_compile"] <= sum(result["timings"][p] for p in phases)
    assert json.loads((out / "attack.json").read_text())["budget"] == 1
    assert "attack" in cli_here("show", out, "--png", out / "m.png").stdout
    single = last_json(cli_here("attack", out, "--budget", "2", "--method", "greedy", "--json"))
    assert single["method"] == "greedy" and single["budget"] == 2


def test_attack_bad_input(run, tmp_path, cli_here):
    out, _ = run
    too_big = cli_here("attack", out, "--budget", "99")
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: ")  # refused before any phase runs
    assert "excludes only 26 units" in too_big.stderr
    bad_divergence = cli_here("attack", out, "--divergence", "kll")
    assert bad_divergence.returncode == 2 and bad_divergence.stderr.startswith("error: unknown divergence")
    bad_method = cli_here("attack", out, "--method", "greedyy")
    assert bad_method.returncode == 2 and "did you mean 'greedy'" in bad_method.stderr
    other = tmp_path / "other"
    shutil.copytree(out, other)
    record = json.loads((other / "explanation.json").read_text())
    record["model"]["name"] = "planted-distractor"  # a run folder that claims another model
    (other / "explanation.json").write_text(json.dumps(record))
    proc = cli_here("attack", other)
    assert proc.returncode == 2 and "changed since" in proc.stderr


def test_train_without_adversary_flag(tmp_path, cli_here):
    result = last_json(
        cli_here(
            "train",
            "--model",
            "planted-cancel",
            "--adversary",
            "none",
            "--out",
            tmp_path / "r",
            "--json",
            "--no-progress",
        )
    )
    assert result["config"]["adversary"] is None
    assert result["config"]["init_from"] == "logit"  # "auto", made concrete: one run starts closed
    assert result["kept"]["unembed.in"] == [1]
    bad = cli_here("train", "--model", "planted-cancel", "--adversary", "lerned", "--out", tmp_path / "r2")
    assert bad.returncode == 2 and "did you mean 'learned'" in bad.stderr


def test_train_from_open_gates_finds_the_planted_truth(tmp_path, cli_here):
    """``--init-logit 2`` starts every gate open; training closes what the budget can lose."""
    args = ["--model", "planted-joint", "--init-logit", "2", "--adversary", "none", "--steps", "400"]
    result = last_json(cli_here("train", *args, "--out", tmp_path / "r", "--json", "--no-progress"))
    assert result["config"]["init_logit"] == 2.0
    assert result["kept"] == {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]}


def test_train_from_integrated_gradients_finds_the_planted_truth(tmp_path, cli_here):
    """``--init-from integrated_gradients`` starts the gates by their units' rank; training from
    there finds the planted truth, as from open gates."""
    args = ["--model", "planted-joint", "--init-from", "integrated_gradients", "--adversary", "none"]
    result = last_json(cli_here("train", *args, "--steps", "400", "--out", tmp_path / "r", "--json", "--no-progress"))
    assert result["config"]["init_from"] == "integrated_gradients"
    assert result["kept"] == {"blocks.0.attn.in": [0], "blocks.0.mlp.in": [1, 2], "unembed.in": [3]}


def test_truth_needs_a_model_with_ground_truth(tmp_path, cli_here):
    model = tmp_path / "model"
    shutil.copytree(resolve_model("planted-distractor"), model)
    (model / "truth.json").unlink()
    last_json(cli_here("train", "--model", model, "--out", tmp_path / "r", "--json", *ANY_RUN))
    proc = cli_here("eval", tmp_path / "r", "--truth")
    assert proc.returncode == 2 and "has no truth.json" in proc.stderr


def test_usage_errors_exit_2():
    proc = cli("train")
    assert proc.returncode == 2 and "--model" in proc.stderr


def test_a_later_command_loads_the_programs_an_earlier_one_compiled(tmp_path):
    """Commands keep compiled programs in ``EXPLAINER_COMPILE_CACHE``: the same run again adds
    nothing there (every program it needs is loaded, none compiled anew)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(EXPLAINER_COMPILE_CACHE=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    folder = tmp_path / "xla"

    def train(out: str) -> set[str]:
        command = [sys.executable, "-m", "explainer.cli", "train", "--model", "planted-joint", *ANY_RUN]
        done = subprocess.run([*command, "--out", str(tmp_path / out)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return set(os.listdir(folder))

    first = train("a")
    assert any(name.startswith("jit_") for name in first)
    assert train("b") == first
