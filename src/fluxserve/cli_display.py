"""How the ``fluxserve`` command shows things: ``rich`` tables and progress on a terminal, plain
lines in pipes and logs."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fluxserve.client.generate import PlainProgress, ProgressView, RichProgress
from fluxserve.weights import WeightsStatus, human_bytes

PIPE_WIDTH = 200  # rich wraps at 80 columns when stdout is not a terminal; tables read better wider


def stdout_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def progress_view() -> ProgressView:
    """A live progress bar when stderr is a terminal, else one line per change."""
    if sys.stderr.isatty():
        return RichProgress(Console(stderr=True))
    return PlainProgress(lambda line: print(line, file=sys.stderr, flush=True))


def _gated(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def models_table(rows: list[WeightsStatus]) -> Table:
    table = Table(title="Models (the registry in effect)", title_justify="left")
    for column in ("model", "family / pipeline", "source", "cached", "size", "licence", "gated", "steps / guidance / strength"):
        table.add_column(column, overflow="fold")
    for row in rows:
        cached = row.cached if row.kind == "hub" else ("present" if row.cached == "yes" else "missing")
        defaults = f"{row.steps} / {row.guidance:g} / {row.strength:g}"
        cells = (row.name, f"{row.family}\n{row.pipeline}", f"{row.source}\n({row.kind})", cached,
                 human_bytes(row.size_bytes), row.licence, _gated(row.gated), defaults)
        table.add_row(*(escape(cell) for cell in cells))  # "FLUX.1 [dev]" is not markup
    return table
