"""The capsim command line: a thin typer shell over the package's public functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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


def _ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None
    return values


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="reference model preset: tiny or gpt2-small")] = "tiny",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (half precision on GPUs)")] = "float32",
    quick: Annotated[bool, typer.Option(help="a short sweep (under 30 s on 2 CPU cores)")] = False,
    max_batch_size: Annotated[int, typer.Option(help="largest batch size (powers of two up to it)")] = 32,
    prompt_tokens: Annotated[str | None, typer.Option(help="prompt lengths, e.g. 16,64,256")] = None,
    context_tokens: Annotated[str | None, typer.Option(help="decode context lengths, e.g. 16,256,1024")] = None,
    out_dir: Annotated[Path, typer.Option(help="folder for the profile CSV")] = Path("data/profiles"),
) -> None:
    """Measure the reference model's prefill and decode kernels into a service-time profile."""
    from capsim.core.profiler import run_profile
    from capsim.model.profile import ServiceTimeProfile

    try:
        path = run_profile(
            model,
            device=device,
            dtype=dtype,
            quick=quick,
            max_batch_size=max_batch_size,
            prompt_tokens=_ints(prompt_tokens, "--prompt-tokens"),
            context_tokens=_ints(context_tokens, "--context-tokens"),
            out_dir=out_dir,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    prof = ServiceTimeProfile.from_csv(path)
    typer.echo(f"wrote {path}")
    typer.echo(_profile_summary(prof))


@app.command()
def demo(
    profile_dir: Annotated[Path, typer.Option(help="where the quick profile is written")] = Path("data/profiles"),
) -> None:
    """The main job on embedded defaults: profile this machine, show batching, plan with the simulator."""
    from capsim.demo import run_demo

    run_demo(typer.echo, profile_dir)


def _profile_summary(prof: object) -> str:
    from capsim.model.profile import ServiceTimeProfile

    assert isinstance(prof, ServiceTimeProfile)
    frame = prof.to_frame()
    table = frame.pivot_table(index="batch_size", columns=["phase", "tokens"], values="p50_ms")
    text: str = table.round(3).to_string()
    return "median latency (ms) by batch size (rows) and phase/tokens (columns):\n" + text


if __name__ == "__main__":  # pragma: no cover
    app()
