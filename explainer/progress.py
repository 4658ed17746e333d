"""Progress on stderr (so ``--json`` output stays clean): a bar for long loops (rich, or plain lines
when stderr is not a terminal), announced phases, and a heartbeat that keeps a phase from going
silent for longer than :data:`SILENCE` seconds where its work has no steps of its own to show."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

SILENCE = 30.0  # seconds an announced phase may go without a line on stderr before its heartbeat
_last_said = [time.perf_counter()]  # when progress last wrote to stderr (a line or a bar update)


def said() -> None:
    """Note that progress just reached stderr (what a heartbeat waits on)."""
    _last_said[0] = time.perf_counter()


def say(text: str) -> None:
    """``text`` as a line on stderr, noted as progress."""
    print(text, file=sys.stderr, flush=True)
    said()


@contextmanager
def heartbeat(name: str, every: float = SILENCE, line: Callable[[float], str] | None = None) -> Iterator[None]:
    """While the block runs, ``name ... [Ns]`` on stderr (``line(N)`` when given) whenever nothing
    has been said for ``every`` seconds within it (a daemon thread; it stops with the block).

    >>> with heartbeat("repair", every=60.0):
    ...     pass
    """
    started, stop = time.perf_counter(), threading.Event()
    line = line or (lambda elapsed: f"{name} ... [{elapsed:.0f}s]")

    def beat() -> None:  # silence counts from the block's start at the earliest
        while not stop.wait(max(0.01, every - (time.perf_counter() - max(_last_said[0], started)))):
            now = time.perf_counter()
            if now - max(_last_said[0], started) >= every:
                say(line(now - started))

    thread = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class progress_bar:
    """Context manager yielding ``advance(done, text)``; a no-op when ``enabled`` is false.

    On a terminal it draws a rich bar on stderr; when stderr is not a terminal (a log file, a job
    scheduler, a pipe) it prints a plain line at most every ``interval`` seconds and one at the end,
    and while ``advance`` is not called (a step that compiles, a slow stretch) the last line again
    once nothing has been said for ``interval`` seconds, so long work is never silent.

    >>> with progress_bar(False, 10) as advance:
    ...     advance(5, "halfway")
    """

    def __init__(self, enabled: bool, total: int, label: str = "training", interval: float = 10.0):
        self.enabled, self.total, self.label, self.interval = enabled, total, label, interval
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda done, text: None
        if not sys.stderr.isatty():
            return self._lines()
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn(self.label),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.__enter__()
        task = self.bar.add_task("", total=self.total)

        def advance(done: int, text: str) -> None:
            self.bar.update(task, completed=done, description=text)
            said()

        return advance

    def _lines(self):
        started = time.perf_counter()
        self.last_line: tuple[int, str] | None = None  # reported by advance, not printed yet
        latest = [(0, "")]  # what the heartbeat repeats

        def advance(done: int, text: str) -> None:
            now = time.perf_counter()
            self.last_line = latest[0] = (done, text)
            # silence since the bar opened, or since the last line said (this bar's own among them)
            if now - max(started, _last_said[0]) >= self.interval or done >= self.total:
                self._print(done, text, now - started)
                self.last_line = None

        self.started = started
        self.beating = heartbeat(self.label, self.interval, lambda elapsed: self._line(*latest[0], elapsed))
        self.beating.__enter__()
        return advance

    def _line(self, done: int, text: str, elapsed: float) -> str:
        return f"{self.label} {done}/{self.total} {text} [{elapsed:.0f}s]".replace("  ", " ")

    def _print(self, done: int, text: str, elapsed: float) -> None:
        say(self._line(done, text, elapsed))

    def __exit__(self, *exc):
        if self.enabled and self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.enabled and getattr(self, "beating", None) is not None:
            self.beating.__exit__(None, None, None)
            if self.last_line is not None:
                self._print(*self.last_line, time.perf_counter() - self.started)
        return False


_say = say  # Timings.phase's parameter of that name hides the function


# JAX's monitoring event of one program's XLA compile (not sent for a program loaded from the
# compile cache)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiling = {"seconds": 0.0, "programs": 0, "listening": False}
_compiling_lock = threading.Lock()


def _on_duration(event: str, seconds: float, **_: object) -> None:
    if event == COMPILE_EVENT:
        with _compiling_lock:
            _compiling["seconds"] += seconds
            _compiling["programs"] += 1


def compiled() -> tuple[float, int]:
    """Seconds XLA has spent compiling programs in this process, and how many, since the first
    call (which starts the count: JAX's monitoring reports each compile as it finishes, on any
    thread)."""
    with _compiling_lock:
        if not _compiling["listening"]:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            _compiling["listening"] = True
        return float(_compiling["seconds"]), int(_compiling["programs"])


class Timings(dict):
    """Seconds per phase of a run (compile, train, each finishing pass, evaluate, save), in the
    order the phases first ran; a phase that runs again adds to its time. :meth:`rounded` adds
    ``xla_compile``: the seconds XLA spent compiling programs since the timings were made, within
    whichever phases did it (the step's first call, scoring's and evaluation's programs, small
    array operations run one by one); a program loaded from the compile cache costs none.

    >>> t = Timings()
    >>> with t.phase("train"):
    ...     pass
    >>> list(t), t["train"] >= 0, list(t.rounded())
    (['train'], True, ['train', 'xla_compile'])
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.compiled_from: float | None = compiled()[0]

    @classmethod
    def of_record(cls, record: dict[str, float]) -> Timings:
        """A saved run's timings, as they were recorded (``xla_compile`` included, not counted on)."""
        out = cls(record)
        out.compiled_from = None
        return out

    @contextmanager
    def phase(self, name: str, say: bool = False, every: float = SILENCE) -> Iterator[None]:
        """Time the block as phase ``name``; ``say``: announce it on stderr, keep it from going
        silent for ``every`` seconds (:func:`heartbeat`), and give its time when done."""
        started = time.perf_counter()
        if say:
            _say(f"{name} ...")
        try:
            with heartbeat(name, every) if say else nullcontext():
                yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started
            if say:
                _say(f"{name} done [{time.perf_counter() - started:.1f}s]")

    def rounded(self) -> dict[str, float]:
        """The timings as plain floats, to the millisecond (for JSON), and ``xla_compile``."""
        out = {k: round(float(v), 3) for k, v in self.items()}
        if self.compiled_from is None:  # a saved run's, as recorded
            return out
        return out | {"xla_compile": round(compiled()[0] - self.compiled_from, 3)}
