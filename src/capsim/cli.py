"""The capsim command line: a thin typer shell over the package's public functions."""

from __future__ import annotations

import typer

import capsim

app = typer.Typer(
    name="capsim",
    help="Capacity planning for containerized AI agents: measure, simulate, study, export.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the capsim version."""
    typer.echo(capsim.__version__)


if __name__ == "__main__":  # pragma: no cover
    app()
