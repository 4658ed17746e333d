"""The sweep: a ladder trained, finished, graded and saved as one folder (``explainer sweep``).

:func:`sweep` runs :func:`~explainer.frontier.ladder.train_ladder`, then
:func:`~explainer.frontier.select.at_most` on a ladder of sizes, then
:func:`~explainer.frontier.grade.grade_masks`, and saves every rung as a run folder beside
``frontier.json`` and ``frontier.png``; :func:`resume_sweep` continues an interrupted one.
docs/guide.md describes the options.

With ``out``, every explanation is saved as a run folder ``OUT/runs/size-K-target-T`` (or
``size-K-lambda-X``: the size kept, then the rung's target) and the result as
``OUT/frontier.json`` with ``OUT/frontier.png``, all written atomically. Meanwhile the sweep holds
the lock ``OUT.lock`` and checkpoints into ``OUT.partial/`` (:func:`explainer.runs.lifecycle`,
as ``explainer train`` does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from explainer import runs
from explainer.errors import ExplainerError
from explainer.frontier import (
    empty_mask,
    full_mask,
    mib_ladder,
)
from explainer.frontier.grade import grade_masks
from explainer.frontier.ladder import (
    DIRECTIONS,
    PATIENCE,
    TRIVIAL_LOGIT,
    Rung,
    check_patience,
    check_steps,
    choose_strategy,
    ladder_program,
    train_ladder,
)
from explainer.frontier.select import (
    adversarial_gap,
    at_most,
    exact_sets,
    open_restart,
    rankings_of,
)
from explainer.masks import Gates
from explainer.models.folders import swap_into_place
from explainer.parallel import data_parallel
from explainer.progress import Timings
from explainer.scrub import ABLATIONS, Scrubber, check_ablation
from explainer.train.config import Dims, KLBudget, TrainConfig, flag, resolved_start
from explainer.train.config_files import from_dict, load_config
from explainer.train.step import (
    InLoopAdversary,
)
from explainer.verdicts import sweep_warnings

FRONTIER_FILE = "frontier.json"


def parse_ladder(text: str | Sequence[float | int] | None, kind: str) -> list[float] | None:
    """``"1,2,4"`` (or a list) as numbers; sizes must be integers >= 0, penalties >= 0."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ExplainerError(f"--{kind} takes comma-separated numbers, e.g. 1,2,4; got {item!r}") from None
        if not math.isfinite(value) or value < 0 or (kind == "sizes" and value != int(value)):
            what = "integers >= 0" if kind == "sizes" else "numbers >= 0"
            raise ExplainerError(f"--{kind} must be {what}; got {item!r}")
        values.append(value)
    if not values:
        raise ExplainerError(f"--{kind} is empty; give comma-separated values, e.g. 1,2,4")
    return sorted(set(values))


def check_sweepable(config: TrainConfig) -> KLBudget:
    """Refuse settings a sweep cannot carry; returns the KL budget its selection works to.

    A sweep sets every rung's penalty from its ladder and trains in the standard basis, without
    positional gates or rewrites (those need one size at a time: ``explainer train``).
    """
    if not isinstance(config.penalty, KLBudget):
        name = next(iter(dataclasses.asdict(config.penalty)))
        raise ExplainerError(
            f"a sweep sets each rung's penalty from --sizes or --lambdas; drop {name} ({flag(name)}) from its settings"
        )
    units = config.units
    if isinstance(units, Dims) and units.rewrites:
        raise ExplainerError(
            "sweep does not apply rewrites; train one size at a time with "
            "`explainer train --rewrite ... --target-size K` instead"
        )
    for name, standard in (("basis", "standard"), ("positional", False)):
        value = getattr(units, name, standard)
        if value != standard:
            raise ExplainerError(
                f"sweep trains in the standard basis over dimensions, not with {name} = {value!r}; drop it, or "
                f"train one size at a time with `explainer train --{name}"
                f"{'' if name == 'positional' else ' ' + str(value)} --target-size K`"
            )
    return config.penalty


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not (out / FRONTIER_FILE).is_file():
        if out.is_dir() and not any(out.iterdir()):
            return
        raise ExplainerError(f"{str(out)!r} exists and is not a sweep folder; choose another --out (nothing changed)")
    if not overwrite:
        raise ExplainerError(f"sweep folder {str(out)!r} already exists; pass --overwrite or choose another --out")


def _trivial_rung(mode: str, value: float, n_units: dict[str, int], keep_all: bool) -> Rung:
    logit = TRIVIAL_LOGIT if keep_all else -TRIVIAL_LOGIT
    gates = Gates({s: jnp.full((n,), logit, jnp.float32) for s, n in n_units.items()})
    keep = full_mask(n_units) if keep_all else empty_mask(n_units)
    return Rung(mode, value, gates, keep, {})


def sweep(
    model: str | os.PathLike = "planted-distractor",
    task: str | os.PathLike | None = None,
    lambdas: str | Sequence[float | int] | None = None,
    sizes: str | Sequence[float | int] | None = None,
    config: TrainConfig | str | os.PathLike | None = None,
    adversary: InLoopAdversary | str | None = "learned",
    budget: int = 2,
    ablations: Sequence[str] | None = ABLATIONS,
    strategy: str = "auto",
    continuation_steps: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    direction: str = "both",
    patience: int = PATIENCE,
    **settings: Any,
) -> dict[str, Any]:
    """Train a ladder of explanations of ``model`` on ``task`` and grade them: the frontier.

    ``sizes`` (target sizes) or ``lambdas`` (fixed penalties), as ``"1,2,4"`` or a list; neither
    means MIB's ladder of sizes. ``settings`` override ``config`` as in :func:`explainer.explain`.
    Returns ``{"records": [...], "cpr", "cmd", "ablations", ...}`` (:func:`grade_masks`); with
    ``out``, also the folder of the module docstring. The other options are :func:`prepare`'s.

    >>> f = sweep("planted-distractor", sizes=[1, 2], adversary="none", ablations=(), steps=300, progress=False)
    >>> [(r["size"], round(r["normalized_faithfulness"], 2)) for r in f["records"]]
    [(0, 0.0), (2, 1.0)]
    """
    spec = prepare(
        model, task, lambdas, sizes, config, adversary, budget, ablations, strategy, continuation_steps,
        out, overwrite, progress, resume, direction, patience, settings,
    )  # fmt: skip
    return _run(spec, resume, overwrite)


def _run(spec: SweepSpec, resume: bool, overwrite: bool) -> dict[str, Any]:
    """``spec``'s sweep, inside the run lifecycle when it has a folder (lock, resume, finish)."""
    if spec.out is None:
        return _sweep(spec, None)
    run = runs.lifecycle(
        spec.out, spec.record(), resume=resume, overwrite=overwrite,
        check_same=_check_same_sweep, check_free=_check_out, command="sweep",
    )  # fmt: skip
    with run as checkpoints:
        return _sweep(spec, checkpoints)


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep as :func:`prepare` validated and resolved it: what :func:`_sweep` trains, grades and
    saves, and what ``OUT.partial/resume.json`` records."""

    folder: Path
    task: Any
    the_task: Any
    train: Any
    scrubber: Scrubber
    config: TrainConfig
    adversary: Any
    mode: str
    values: list[float]
    trivial: list[float]
    budget: int
    ablations: tuple[str, ...]
    strategy: str
    continuation_steps: int | None
    direction: str
    patience: int
    out: Path | None
    overwrite: bool
    progress: bool
    started: float

    @property
    def total(self) -> int:
        return sum(self.scrubber.n_units.values())

    @property
    def trained_values(self) -> list[float]:
        return [v for v in self.values if v not in self.trivial]

    def record(self) -> dict[str, Any]:
        """The settings a resumed sweep must agree with."""
        from explainer.api import _model_record

        adversary, task = self.adversary, self.task
        return {
            "kind": "sweep",
            "model": _model_record(self.folder),
            "task": str(Path(task).resolve()) if task is not None and Path(task).is_file() else task,
            "config": self.config.to_json(),
            "adversary": getattr(adversary, "name", None),
            "adversary_settings": dataclasses.asdict(adversary) if dataclasses.is_dataclass(adversary) else None,
            "overwrite": self.overwrite,
            "mode": self.mode,
            "ladder": self.values,
            "budget": self.budget,
            "ablations": list(self.ablations),
            "strategy": self.strategy,
            "continuation_steps": self.continuation_steps,
            "direction": self.direction,
            "patience": self.patience,
        }


def prepare(
    model, task, lambdas, sizes, config, adversary, budget, ablations, strategy, continuation_steps,
    out, overwrite, progress, resume, direction, patience, settings,
) -> SweepSpec:  # fmt: skip
    """Check :func:`sweep`'s arguments once (each refusal names the fix), then load the model and
    task and resolve the ladder and the strategy.

    ``direction`` is the way a continuation ladder of sizes trains (:func:`train_ladder`:
    ``both``, ``up`` or ``down``). A rung after the first (at most ``continuation_steps`` steps),
    the first where the gates start from a ranking (at most ``steps``; the default start) and an
    open restart (at most ``steps``) stop once their explanation, and the adversary's
    attacks on it, have stayed the same for ``patience`` steps (0: never early), on a ladder of
    sizes. ``resume``
    continues an unfinished sweep in ``out`` (:func:`resume_sweep` reads its settings back).
    """
    from explainer.models import load_model
    from explainer.tasks import resolve_task
    from explainer.zoo import resolve_model

    started = time.perf_counter()
    if lambdas is not None and sizes is not None:
        raise ExplainerError("give either --lambdas or --sizes, not both")
    if not isinstance(config, TrainConfig):
        config = load_config(config) if config is not None else TrainConfig()
    config = config.replace(**settings)
    config = resolved_start(config, ladder=True)
    check_sweepable(config)
    if direction not in DIRECTIONS:
        raise ExplainerError(f"unknown ladder direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    check_patience(patience)
    if continuation_steps is not None:
        check_steps("--continuation-steps", continuation_steps, 1)
    if isinstance(adversary, str) or adversary is None:
        from adversary.learned import make_adversary

        adversary = make_adversary(adversary)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ExplainerError(f"--budget must be an integer >= 0, got {budget!r}")
    ablations = tuple(ablations or ())
    for a in ablations:
        check_ablation(a)
    out_path = Path(out) if out is not None else None
    if resume and out_path is None:
        raise ExplainerError("resume=True needs the sweep folder to continue (out)")
    if out_path is not None and not resume:
        _check_out(out_path, overwrite)
        if not overwrite:
            _refuse_unfinished(out_path)
    folder = resolve_model(model)
    runtime = config.runtime  # --shard-weights: the weights live split from here on (explainer.parallel)
    net = data_parallel(runtime.devices, config.optimiser.batch_size, runtime.shard_weights).shard_model(
        load_model(folder, config.dtype)
    )
    the_task = resolve_task(task, folder)
    the_task.check(net.config)
    train = the_task.train_data()
    scrubber = Scrubber.build(net, train, config.units.sites, config.ablation, units=config.units.kind)
    total = sum(scrubber.n_units.values())
    mode = "lambdas" if lambdas is not None else "sizes"
    values = parse_ladder(lambdas, "lambdas") if lambdas is not None else parse_ladder(sizes, "sizes")
    if values is None:
        values = [float(k) for k in mib_ladder(total)]
    trivial = [v for v in values if mode == "sizes" and (v == 0 or v >= total)]
    return SweepSpec(
        folder, task, the_task, train, scrubber, config, adversary, mode, values, trivial, budget, ablations,
        choose_strategy(strategy, scrubber), continuation_steps, direction, patience, out_path, overwrite,
        progress, started,
    )  # fmt: skip


def _sweep(spec: SweepSpec, checkpoints: Path | None) -> dict[str, Any]:
    """Train, grade and save the ladder of ``spec``."""
    from explainer.api import _model_record, _task_record

    scrubber, train, config, mode, values, adversary = (
        spec.scrubber, spec.train, spec.config, spec.mode, spec.values, spec.adversary
    )  # fmt: skip
    strategy, trained_values, trivial, total, out_path = (
        spec.strategy, spec.trained_values, spec.trivial, spec.total, spec.out
    )  # fmt: skip
    t0 = time.perf_counter()
    timings = Timings()  # compile: each stretch's first step; train: the rest of the ladder's time
    rungs = {}
    # one step for the ladder and its open restarts (a pair of restarts reuses its compiled program)
    program = ladder_program(scrubber, train, config, mode, adversary) if trained_values else None
    if trained_values:
        for r in train_ladder(
            scrubber,
            train,
            config,
            mode,
            trained_values,
            adversary,
            strategy,
            spec.continuation_steps,
            spec.progress,
            checkpoints,
            spec.direction,
            spec.patience,
            program=program,
            timings=timings,
        ):
            rungs[r.value] = r
    train_seconds = time.perf_counter() - t0
    timings["train"] = train_seconds - timings.get("compile", 0.0) - timings.get("init_gates", 0.0)
    for v in trivial:
        rungs[v] = _trivial_rung(mode, v, scrubber.n_units, keep_all=v >= total)
    ordered = [rungs[v] for v in values]
    if mode == "sizes":
        restart = open_restart(
            scrubber, train, config, adversary, checkpoints, spec.patience, program, spec.progress, timings
        )
        exact = exact_sets(config, adversary)
        seed = config.optimiser.seed
        gap = adversarial_gap(scrubber, train, spec.budget, seed, spec.progress) if adversary is not None else None
        with timings.phase("select", say=spec.progress):
            with timings.phase("rank"):  # the rankings whose top sets each rung is compared with
                rankings = rankings_of(scrubber, train, seed)
            ordered = at_most(
                scrubber,
                train,
                ordered,
                seed,
                config.penalty.kl_budget,
                restart,
                exact,
                gap=gap,
                timings=timings,
                progress=spec.progress,
                rankings=rankings,
            )
    with timings.phase("grade", say=spec.progress):
        graded = grade_masks(
            scrubber,
            train,
            spec.the_task.heldout_data(),
            [r.keep for r in ordered],
            spec.budget,
            config.optimiser.seed,
            spec.ablations,
            progress=spec.progress,
            budgets=[int(r.value) for r in ordered] if mode == "sizes" else None,
        )
    result: dict[str, Any] = {
        "records": graded["records"],
        "cpr": graded["cpr"],
        "cmd": graded["cmd"],
        "model": _model_record(spec.folder),
        "task": _task_record(spec.task, spec.the_task),
        "mode": mode,
        "ladder": values,
        "strategy": strategy,
        "adversary": getattr(adversary, "name", None),
        **{k: v for k, v in graded.items() if k not in ("records", "cpr", "cmd")},
        "train_seconds": train_seconds,
        "timings": timings,
    }
    for rung, record in zip(ordered, result["records"], strict=True):
        record["target"] = int(rung.value) if mode == "sizes" else rung.value
        record["run"] = str(out_path / "runs" / rung.name) if out_path is not None else None
    n_wrong = int(spec.the_task.heldout_data().wrong_answers.shape[1])
    result["warnings"] = sweep_warnings(result, len(train), config.optimiser.batch_size, n_wrong)
    result["seconds"] = time.perf_counter() - spec.started
    if out_path is not None:
        with timings.phase("save"):
            _save(out_path, spec.overwrite, result, ordered, scrubber, config, adversary, strategy)
    result["timings"] = timings.rounded()
    return result


def _refuse_unfinished(out: Path) -> None:
    if runs.partial_path(out).exists():
        raise ExplainerError(
            f"sweep folder {str(out)!r} has an unfinished sweep in {runs.partial_path(out)}; continue "
            f"it with `explainer sweep --resume {out}`, or pass --overwrite to start again"
        )


def _read_record(out: Path) -> dict[str, Any]:
    if not (runs.partial_path(out) / runs.RECORD_FILE).is_file() and (out / FRONTIER_FILE).is_file():
        raise ExplainerError(f"sweep {str(out)!r} has finished; there is nothing to resume")
    record = runs.read_record(out)
    if record.get("kind") != "sweep":
        raise ExplainerError(f"{str(out)!r} is an unfinished `explainer train` run; resume it with `explainer train`")
    return record


def _check_same_sweep(out: Path, record: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with anything other than what it was started with."""
    recorded = _read_record(out)
    recorded["config"] = from_dict(recorded["config"], source=f"sweep {str(out)!r}").to_json()  # older records too
    if recorded["model"].get("sha256") != record["model"]["sha256"]:
        raise ExplainerError(
            f"the weights of {record['model']['path']!r} changed since sweep {str(out)!r} started (sha256 "
            "differs); it cannot be resumed: start again with --overwrite"
        )
    # sweeps started before the setting went both ways, and before rungs stopped once settled
    recorded = {"direction": "both", "patience": 0, **recorded}
    for key, value in record.items():
        if key not in ("model", "overwrite") and recorded.get(key) != value:
            raise ExplainerError(
                f"sweep {str(out)!r} was started with {key} {recorded.get(key)!r}, not {value!r}; "
                "resume it with the recorded settings (`explainer sweep --resume OUT` alone)"
            )


def resume_sweep(out: str | os.PathLike, progress: bool = True, **given: Any) -> dict[str, Any]:
    """Continue the unfinished sweep ``out`` (killed, or stopped by a fault) from its checkpoints.

    The settings come from ``OUT.partial/resume.json``; anything in ``given`` (``model``, ``task``,
    ``sizes``, ``budget``, a training setting such as ``steps``, ...) must agree with them. The
    result is what an uninterrupted sweep would have saved (bit for bit on the same machine).
    """
    from explainer.api import _refuse_conflicts

    out = Path(out)
    record = _read_record(out)
    recorded = from_dict(dict(record["config"]), source=f"sweep {str(out)!r}")
    given = {k: v for k, v in given.items() if v is not None}
    ladder = {"lambdas": given.pop("lambdas", None), "sizes": given.pop("sizes", None)}
    sweep_settings = {
        "mode": next((k for k, v in ladder.items() if v is not None), record["mode"]),
        "ladder": parse_ladder(ladder[record["mode"]], record["mode"]) or record["ladder"],
        "budget": given.pop("budget", record["budget"]),
        "ablations": list(given.pop("ablations", record["ablations"])),
        "strategy": given.pop("strategy", record["strategy"]),
        "direction": given.pop("direction", record.get("direction", "both")),
        "patience": given.pop("patience", record.get("patience", 0)),
        "continuation_steps": given.pop("continuation_steps", record["continuation_steps"]),
    }
    record = {"direction": "both", "patience": 0, **record}
    differ = [f"{k} {v!r} (recorded: {record[k]!r})" for k, v in sweep_settings.items() if v != record[k]]
    if differ:
        raise ExplainerError(
            f"--resume continues sweep {str(out)!r} with the settings it was started with; these differ: "
            f"{', '.join(differ)}. Drop them, or start a new sweep with --overwrite"
        )
    _refuse_conflicts(out, record, recorded, given)
    adversary: Any = record["adversary"] or "none"
    if record.get("adversary_settings") and record["adversary"] == "learned":
        from adversary.learned import make_adversary

        settings = {k: v for k, v in record["adversary_settings"].items() if k != "name"}
        adversary = make_adversary("learned", **settings)
    return sweep(
        record["model"].get("name") or record["model"]["path"],
        record["task"],
        **{record["mode"]: record["ladder"]},
        config=recorded,
        adversary=adversary,
        budget=record["budget"],
        ablations=record["ablations"],
        strategy=record["strategy"],
        continuation_steps=record["continuation_steps"],
        out=out,
        overwrite=record["overwrite"],
        progress=progress,
        resume=True,
        direction=record["direction"],
        patience=record["patience"],
    )


def _explanation(rung: Rung, record: dict[str, Any], result: dict[str, Any], scrubber, config, adversary, strategy):
    from explainer.explanation import Explanation

    run_config = config.replace(**({"target_size": int(rung.value)} if rung.mode == "sizes" else {"lam": rung.value}))
    faithfulness = {k: record[k] for k in record if k.startswith(("kl_", "logit_diff", "accuracy", "loss"))}
    faithfulness["normalized_faithfulness"] = record["normalized_faithfulness"]
    return Explanation(
        kept=record["kept"],
        n_units=scrubber.n_units,
        gate_logits={s: np.asarray(v) for s, v in rung.gates.logits.items()},
        model=result["model"],
        task=result["task"],
        config={
            **run_config.to_json(),
            "kl_budget": config.penalty.kl_budget,
            "adversary": getattr(adversary, "name", None),
            "sweep": strategy,
        },
        faithfulness=faithfulness,
        history=rung.history or None,
        attack_result=None,
    )


def _save(out: Path, overwrite: bool, result, rungs: list[Rung], scrubber, config, adversary, strategy) -> None:
    from explainer.models.native import write_json
    from explainer.plotting import plot_frontier

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rung, record in zip(rungs, result["records"], strict=True):
            _explanation(rung, record, result, scrubber, config, adversary, strategy).save(tmp / "runs" / rung.name)
        plot_frontier({"ours": result}, tmp / "frontier.png", title=_title(result))
        result["png"] = str(out / "frontier.png")
        from_cli = Path(sys.argv[0]).name in ("explainer", "cli.py")
        result["command"] = " ".join(["explainer", *sys.argv[1:]]) if from_cli else None
        write_json(tmp / FRONTIER_FILE, result)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _title(result: dict[str, Any]) -> str:
    name = result["model"].get("name") or Path(result["model"]["path"]).name
    areas = f"CPR {result['cpr']:.3f}, CMD {result['cmd']:.3f}, KL area {result['kl_area']:.3g} nats"
    return f"{name} on {result['task']['name']}: {areas}"
