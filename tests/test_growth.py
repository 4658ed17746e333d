"""benchmarks/growth.py: its arithmetic on known inputs, and its pieces on a tiny model (no wall-clock checks)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def growth():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("growth", ROOT / "benchmarks" / "growth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exponent_fit_recovers_known_powers(growth):
    x = [10, 100, 1000, 5000]
    assert growth.fit_exponent(x, [3 * v**1.5 for v in x]) == pytest.approx(1.5)
    assert growth.fit_exponent(x, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert growth.fit_exponent([4, 4], [1, 2]) is None  # one distinct x: no slope


def test_flops_formula_on_gpt2_small(growth):
    cfg = growth.model_config(12, 768, 50257)
    assert (cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]) == (12, 64, 3072)
    # 12 layers × (4·768² + 2·768·3072) + 768·50257: GPT-2 small's 85M block weights plus its unembedding
    assert growth.multiplied_params(cfg) == 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257
    seq = 16
    expected = 2 * growth.multiplied_params(cfg) * seq + 4 * 12 * seq * seq * 768
    assert growth.forward_flops(cfg, seq) == expected
    # doubling the prompt doubles the weight term and quadruples the attention term
    assert growth.forward_flops(cfg, 2 * seq) == 2 * 2 * growth.multiplied_params(cfg) * seq + 4 * expected - 4 * (
        2 * growth.multiplied_params(cfg) * seq
    )


def test_sizes_and_sweep_ladder(growth):
    assert growth.parse_size("6L-d384") == (6, 384)
    assert growth.parse_size("3L-d64") == (3, 64)
    assert growth.sweep_sizes(640) == [20, 40, 80, 160]
    assert growth.sweep_sizes(20) == [1, 2, 3, 5]  # distinct and at least one


def test_one_tiny_size_end_to_end(growth, tmp_path):
    """Training and the attack at a tiny size with a few steps: rows have units, phases, memory."""
    argv = ["--sizes", "1L-d64", "--steps", "3", "--prompts", "24", "--seq", "6", "--vocab", "64"]
    args = growth.parse([*argv, "--commands", "train,attack", "--timeout", "0"])
    size = growth.run_size("1L-d64", args, tmp_path)
    assert size["units"] == 3 * 64  # attn.in, mlp.in, unembed.in
    assert size["edge_units"] > 0
    assert set(size["rows"]) | set(size["skipped"]) == {"train", "attack"}
    for command, row in size["rows"].items():
        assert row["wall_s"] > 0 and row["peak_rss_gb"] > 0 and not row["timed_out"], command
    row = size["rows"]["train"]
    assert row["train_s"] is not None and row["overhead_ratio"] is not None
    assert "compile" in row["timings"] and "evaluate" in row["timings"]
    record = {"steps": 3, "prompts": 24, "seq": 6, "vocab": 64, "device": "cpu", "compile_width": 64, "compile": []}
    record["sizes"] = [size, size]
    record["exponents"] = growth.exponents(record["sizes"])
    record["rows"] = growth.flat_rows(record["sizes"])
    assert len(record["rows"]) == 2 * len(size["rows"])
    growth.plot(record, tmp_path / "growth.png")
    assert (tmp_path / "growth.png").stat().st_size > 0
    json.dumps(record)  # the record is plain JSON


def test_a_command_past_its_timeout_is_stopped_and_marked(growth, tmp_path):
    log = tmp_path / "slow.log"
    ran = growth.run_cli(["train", "--model", "planted-joint", "--out", str(tmp_path / "r")], log, timeout=0.5)
    assert ran["timed_out"] and ran["wall_s"] == 0.5 and ran["result"] == {}


def test_phases_said_on_stderr(growth):
    log = "repair ...\nrepair done [10.1s]\nopen_restart ...\ntraining 5/10\n"
    assert growth.said_phases(log) == ({"repair": 10.1}, "open_restart")
    assert growth.said_phases(log + "open_restart done [2.0s]\n") == ({"repair": 10.1, "open_restart": 2.0}, None)


def test_compile_worker_reports_a_compile(growth):
    args = growth.parse(["--prompts", "16", "--seq", "4", "--vocab", "32"])
    row = growth.compile_worker(1, 32, "dims", args)
    assert row["units"] > 0 and row["first_call_s"] >= row["compile_s"] >= 0


def test_docstring_examples(growth):
    import doctest

    assert doctest.testmod(growth).failed == 0
