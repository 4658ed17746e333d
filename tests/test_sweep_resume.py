"""Kill and resume for ``explainer sweep``: a sweep killed with SIGKILL and resumed ends bit-identical."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from explainer import runs

ARGS = ["--model", "planted-distractor", "--sizes", "1,2,3", "--seed", "0", "--adversary", "none"]
ARGS += ["--steps", "600", "--checkpoint-every", "100", "--ablations", "", "--no-progress"]
TIMING = ("seconds", "train_seconds", "timings", "png", "command")  # and each record's run path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "explainer.cli", *map(str, args)], capture_output=True, text=True)


def _checkpoints(out: Path) -> list[Path]:
    folder = runs.checkpoint_folder(out)
    return sorted(folder.rglob("step-*.safetensors")) if folder.is_dir() else []


def _frontier(out: Path) -> dict:
    data = json.loads((out / "frontier.json").read_text())
    for key in TIMING:
        data.pop(key, None)
    for record in data["records"]:
        assert Path(record.pop("run")).parent == out / "runs"
    return data


def _runs(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "runs").glob("*/explanation.safetensors"))}


def test_sweep_sigkill_then_resume_is_bit_identical(tmp_path):
    whole, killed = tmp_path / "A", tmp_path / "B"
    command = [sys.executable, "-m", "explainer.cli", "sweep", *ARGS, "--out", str(killed)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 240
            while not _checkpoints(killed):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the sweep ended early"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
            time.sleep(random.Random().uniform(0.0, 3.0))
        finally:
            proc.send_signal(signal.SIGKILL)
    if killed.exists():  # pragma: no cover - a fast machine finished before the kill
        pytest.skip("the sweep finished before it could be killed")
    saved = [str(p.relative_to(runs.checkpoint_folder(killed))) for p in _checkpoints(killed)]
    assert saved and runs.lock_path(killed).exists()  # the dead process's lock is left behind
    conflict = cli("sweep", "--resume", killed, "--steps", "500", "--no-progress")
    assert conflict.returncode == 2 and "steps 500 (recorded: 600)" in conflict.stderr, conflict.stderr
    way = cli("sweep", "--resume", killed, "--direction", "up", "--no-progress")
    assert way.returncode == 2 and "direction 'up' (recorded: 'both')" in way.stderr, way.stderr
    resumed = cli("sweep", "--resume", killed, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert not runs.partial_path(killed).exists() and not runs.lock_path(killed).exists()
    again = cli("sweep", "--resume", killed, "--no-progress")
    assert again.returncode == 2 and "nothing to resume" in again.stderr
    assert cli("sweep", *ARGS, "--out", whole).returncode == 0
    assert _runs(killed) == _runs(whole) and len(_runs(whole)) == 3, f"resumed from {saved}"
    assert _frontier(killed) == _frontier(whole)


@pytest.mark.parametrize("strategy,patience", [("vmap", 0), ("continuation", 0), ("vmap", 25), ("continuation", 25)])
def test_train_ladder_resumes_from_a_checkpoint_exactly(tmp_path, strategy, patience):
    """Resumed from an older checkpoint (the newest removed, as if killed before it), every rung's gates
    are bit for bit those of the uninterrupted ladder; a finished ladder reloads without training. With
    ``patience``, a rung that settled stops at the same step when resumed (the checkpoints carry what
    the check had seen)."""
    import numpy as np

    from explainer.frontier.ladder import train_ladder
    from explainer.models import load_model
    from explainer.runs import list_checkpoints
    from explainer.scrub import Scrubber
    from explainer.tasks import resolve_task
    from explainer.train.config import TrainConfig
    from explainer.zoo import resolve_model

    folder = resolve_model("planted-distractor")
    task = resolve_task(None, folder)
    scrubber = Scrubber.build(load_model(folder), task.train_data())
    config = TrainConfig.of(steps=200, checkpoint_every=50)

    def ladder(checkpoints=None):
        rungs = train_ladder(
            scrubber,
            task.train_data(),
            config,
            "sizes",
            [1, 2],
            None,
            strategy,
            120 if patience else 60,
            False,
            checkpoints,
            patience=patience,
            first_patience=patience,
        )
        return [{s: np.asarray(v) for s, v in r.gates.logits.items()} for r in rungs], [r.history for r in rungs]

    whole, history = ladder()
    ladder(tmp_path)  # writes the checkpoints
    last = tmp_path / "both" / "rung-1" if strategy == "continuation" else tmp_path  # both ways, in lockstep
    newest = list_checkpoints(last)
    newest[0][1].unlink()  # killed before its final save: resume from the one before
    again, history_again = ladder(tmp_path)
    for a, b in zip(again, whole, strict=True):
        assert all(np.array_equal(a[s], b[s]) for s in a)
    assert history_again == history
    if patience:  # the later rung settled before its last step, and so did the vmapped batch
        assert min(len(h["kl"]) for h in history) < (120 if strategy == "continuation" else 200), history
