"""A progress bar for long loops: rich, on stderr (so ``--json`` output stays clean), or nothing."""

from __future__ import annotations


class progress_bar:
    """Context manager yielding ``advance(done, text)``; a no-op when ``enabled`` is false.

    >>> with progress_bar(False, 10) as advance:
    ...     advance(5, "halfway")
    """

    def __init__(self, enabled: bool, total: int, label: str = "training"):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda done, text: None
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
        return lambda done, text: self.bar.update(task, completed=done, description=text)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False
