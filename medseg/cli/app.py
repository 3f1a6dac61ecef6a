"""The ``medseg`` Typer application, its root options and exit codes; the command modules register on it."""

from __future__ import annotations

import typer

__all__ = ["EXIT_PROBLEMS_FOUND", "EXIT_USER_ERROR", "app"]

EXIT_USER_ERROR = 2
EXIT_PROBLEMS_FOUND = 1

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: plan, train, predict, evaluate.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
) -> None:
    """medseg: 2D/3D U-Nets on MONAI, exact evaluation in millimetres."""
