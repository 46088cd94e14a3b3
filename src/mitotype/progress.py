"""Rich progress bars shared by training and prediction: count, rate, elapsed, remaining."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}/s" if task.speed else "", style="cyan")


def progress_bar(unit: str = "patches", enabled: bool = True, transient: bool = False, extra: str = "") -> Progress:
    """``extra`` names a task field shown after the rate (the training loss and metrics)."""
    columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit)]
    if extra:
        columns.append(TextColumn(f"{{task.fields[{extra}]}}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
