"""The capsim command line: a thin typer shell over the package's public functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

import capsim
from capsim.errors import CapsimError


class CommandLineError(CapsimError, ValueError):
    """A command's options do not fit together or name an unusable path; the message names the option."""


class _Commands(TyperGroup):
    """capsim's commands, with one error policy for all of them.

    Every ``CapsimError`` (settings, scenarios, profiles, traces, stores, the load generator, budgets), every
    ``OSError`` on a path the user gave, and every bad option becomes ONE line on stderr,
    ``capsim <command>: error: <message naming the file, field or line>``, and exit code 2. A command adds
    nothing for this: it lets the error propagate. ``CAPSIM_DEBUG=1`` shows the traceback instead. A closed
    stdout (``capsim simulate ... | head``) ends the command quietly with status 141, as a shell tool's.
    """

    def invoke(self, ctx: Any) -> Any:  # the Context of the click that typer vendors
        try:
            return super().invoke(ctx)
        except TyperException as exc:  # typer's (vendored click's) usage errors: a bad or missing option
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            _fail(ctx, f"{message} (see capsim {ctx.invoked_subcommand or ''} --help)".replace("  ", " "))
        except CapsimError as exc:
            _fail(ctx, str(exc), exc)
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a shell tool does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not raise again
            raise typer.Exit(128 + 13) from None  # a shell's status for SIGPIPE
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(ctx, f"{where}{exc.strerror or exc}", exc)


def _fail(ctx: Any, message: str, exc: BaseException | None = None) -> NoReturn:
    if exc is not None and os.environ.get("CAPSIM_DEBUG"):
        raise exc
    command = f"capsim {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "capsim"
    typer.echo(f"{command}: error: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


app = typer.Typer(
    name="capsim",
    cls=_Commands,
    help="Capacity planning for containerized AI agents: measure, simulate, study, export.",
    no_args_is_help=True,
    add_completion=False,
)


SET_HELP = ("override a setting: PATH=VALUE, the dotted path a grid uses, the value read as YAML "
            "(--set pods.replicas=4 --set batching.max_wait_ms=5); repeatable")


def _output_dir(path: Path, option: str) -> Path:
    """Check, before any work, that ``path`` can be the output folder: it is a folder or does not exist."""
    if path.exists() and not path.is_dir():
        raise CommandLineError(f"{option} {path} is a file; give a folder (it is created if missing)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandLineError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent if not path.exists() else path, os.W_OK):
                raise CommandLineError(f"{option} {path} is not writable")
            break
    return path


@app.command()
def version() -> None:
    """Print the capsim version, and whether the scheduler and step-time modules run compiled (capsim.native)."""
    from capsim.native import status

    typer.echo(capsim.__version__)
    typer.echo(f"native: {status()}")


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="reference model preset: tiny or gpt2-small")] = "tiny",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (half precision on GPUs)")] = "float32",
    quick: Annotated[bool, typer.Option(help="a short sweep (under 30 s on 2 CPU cores)")] = False,
    max_batch_size: Annotated[int, typer.Option(min=1, help="largest batch size (powers of two up to it)")] = 32,
    prompt_tokens: Annotated[str | None, typer.Option(help="prompt lengths, e.g. 16,64,256")] = None,
    context_tokens: Annotated[str | None, typer.Option(help="decode context lengths, e.g. 16,256,1024")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        help="folder for the profile CSV [default: data/profiles, where an existing profile is kept unless --force]")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing profile in the default folder")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch intra-op threads (default: one per core)")] = None,
    interleave: Annotated[bool, typer.Option(
        help="time the points in shuffled rounds of short visits, all held in memory at once, so a machine whose "
             "speed drifts spreads it over every point instead of bending the profile")] = False,
) -> None:
    """Measure the reference model's prefill and decode kernels into a service-time profile."""
    from capsim.core.profiler import parse_lengths, run_profile
    from capsim.model.profile import ServiceTimeProfile

    prompts = parse_lengths(prompt_tokens, "--prompt-tokens")
    contexts = parse_lengths(context_tokens, "--context-tokens")
    folder = _output_dir(out_dir if out_dir is not None else Path("data/profiles"), "--out-dir")
    try:
        path = run_profile(
            model,
            device=device,
            dtype=dtype,
            quick=quick,
            max_batch_size=max_batch_size,
            prompt_tokens=prompts,
            context_tokens=contexts,
            out_dir=folder,
            threads=threads,
            overwrite=force or out_dir is not None,
            interleave=interleave,
        )
    except CapsimError:
        raise
    except ValueError as exc:  # the engine's checks of --model, --device, --dtype
        raise CommandLineError(str(exc)) from None
    prof = ServiceTimeProfile.from_csv(path)
    typer.echo(f"wrote {path}")
    typer.echo(_profile_summary(prof))


@app.command("profile-steps")
def profile_steps(
    profile_path: Annotated[Path, typer.Argument(help="the service-time profile CSV to add the step model to")],
    out: Annotated[Path, typer.Option(help="where to write the profile with its step model")],
    model: Annotated[str, typer.Option(help="reference model preset: tiny or gpt2-small")] = "tiny",
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 (half precision on GPUs)")] = "float32",
    threads: Annotated[int | None, typer.Option(min=1, help="torch intra-op threads (1: time by CPU time)")] = None,
    workloads: Annotated[int, typer.Option(min=1, help="random continuous-batching workloads to time")] = 6,
) -> None:
    """Time continuous-batching steps of mixed composition and fit the step-time model (docs/continuous.md)."""
    from capsim.core.step_profile import run_step_profile

    try:
        path, fit = run_step_profile(profile_path, out, model=model, device=device, dtype=dtype, threads=threads,
                                     workloads=workloads)
    except CapsimError:
        raise
    except ValueError as exc:
        raise CommandLineError(str(exc)) from None
    c0, c1, c2, c3, c4 = fit.coefficients
    typer.echo(f"wrote {path}")
    typer.echo(f"step = {c0 * 1e3:.3f} ms + {c1 * 1e6:.3f} us/prefill token + {c2 * 1e9:.3f} ns/(token x context) "
               f"+ {c3 * 1e6:.3f} us/decode + {c4 * 1e9:.3f} ns/context token; overhead +- "
               f"{fit.c0_stderr_s * 1e3:.3f} ms, R2 {fit.r2:.3f}, {fit.n_steps} steps")


@app.command("estimate-profile")
def estimate_profile(
    gpu: Annotated[str, typer.Option(help="a100-80gb, h100, h200, l40s or l4 (datasheet peaks)")] = "h100",
    model: Annotated[str, typer.Option(
        help="llama-3-8b, llama-3-70b, mistral-7b, qwen2.5-7b, mixtral-8x7b, gpt2-small, or a Hugging Face "
             "config.json (or its folder)")
    ] = "llama-3-8b",
    mfu: Annotated[float | None, typer.Option(help="share of the peak FLOPs the kernels reach [assumed 0.5]")] = None,
    mbu: Annotated[float | None, typer.Option(help="share of the bandwidth the kernels reach [assumed 0.7]")] = None,
    overhead_ms: Annotated[float | None, typer.Option(help="engine time per step besides kernels [assumed 1.0]")] = None,
    link_latency_us: Annotated[float | None, typer.Option(
        help="one all-reduce's time besides its bytes, us (with --tensor-parallel over 1) [8 over NVLink, 20 over "
             "PCIe: published measurements, docs/profiles.md]")
    ] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(
        help="the KV cache's dtype, as vLLM's --kv-cache-dtype: fp8, bfloat16, float16 [default: the weights']")
    ] = None,
    tensor_parallel: Annotated[int, typer.Option(min=1, help="GPUs a pod splits the model over (vLLM's "
                                                              "--tensor-parallel-size)")] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1, help="largest batch size (powers of two up to it)")] = 256,
    out_dir: Annotated[Path | None, typer.Option(
        help="folder for the profile CSV [default: data/profiles, where an existing profile is kept unless --force]")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing profile in the default folder")] = False,
) -> None:
    """Estimate a GPU's service-time profile from its datasheet and the model's shape (a roofline, not a
    measurement: docs/profiles.md); the simulator reads it as it reads a measured one."""
    from capsim.model.kv_cache import DTYPE_BYTES, kv_cache_blocks
    from capsim.model.roofline import load_gpu, load_model, roofline_profile

    spec = load_gpu(gpu, mfu=mfu, mbu=mbu, step_overhead_ms=overhead_ms, link_latency_us=link_latency_us)
    arch = load_model(model)
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in DTYPE_BYTES:
            raise CommandLineError(f"--kv-cache-dtype {kv_cache_dtype!r}: one of {', '.join(sorted(DTYPE_BYTES))}")
        arch = arch.model_copy(update={"kv_dtype": kv_cache_dtype})
    memory, shape = round(spec.memory_gib, 3), arch.shape()
    blocks = kv_cache_blocks(memory, 0.9, shape, 16, tensor_parallel)
    if blocks < 1:
        raise CommandLineError(f"--tensor-parallel {tensor_parallel}: {arch.name}'s {arch.weights_gib:.1f} GiB of "
                               f"weights over {tensor_parallel} GPU(s) leave no KV cache in {memory} GiB a GPU at "
                               "gpu_memory_utilization 0.9; split it over more GPUs")
    folder = _output_dir(out_dir if out_dir is not None else Path("data/profiles"), "--out-dir")
    gpus = gpu if tensor_parallel == 1 else f"{gpu}x{tensor_parallel}"
    kv = f"-kv{arch.kv_dtype}" if arch.kv_dtype not in (None, arch.dtype) else ""
    path = folder / f"roofline-{gpus}-{arch.name}-{arch.dtype}{kv}.csv"
    if path.exists() and not (force or out_dir is not None):
        raise CommandLineError(f"{path} exists and is kept: give --force to overwrite it, or --out-dir")
    prof = roofline_profile(spec, arch, tensor_parallel=tensor_parallel, max_batch_size=max_batch_size)
    prof.to_csv(path)
    fit = prof.metadata["estimate"]["linear_fit"]
    c0, c1, _, c3, c4 = fit["coefficients"]
    typer.echo(f"wrote {path} (ESTIMATED by a roofline, not measured: mfu {spec.mfu}, mbu {spec.mbu}, "
               f"{spec.step_overhead_ms} ms a step are assumptions"
               + (f"; {spec.link_latency_us:g} us an all-reduce, {2 * arch.n_layers} all-reduces a step, from "
                  "published measurements" if tensor_parallel > 1 else "") + ")")
    typer.echo(f"{arch.name}: {arch.params / 1e9:.2f}B parameters, {arch.weights_gib:.1f} GiB of weights, "
               f"{arch.kv_bytes_per_token / 1024:.0f} KiB of KV cache a token; on {tensor_parallel} x {spec.name} "
               f"({memory} GiB each) at gpu_memory_utilization 0.9 and no activation peak, {blocks:,} blocks of 16 "
               f"tokens ({blocks * 16:,} tokens); a scenario sizes it with batching.gpu_memory_gb {memory}, "
               f"batching.tensor_parallel_size {tensor_parallel} and batching.model {shape.model_dump()}")
    typer.echo("a linear step model fitted to it (for reading; the simulator takes the roofline itself): "
               f"{c0 * 1e3:.2f} ms + {c1 * 1e6:.2f} us/prefill token + {c3 * 1e6:.2f} us/decode + "
               f"{c4 * 1e9:.2f} ns/context token, R2 {fit['r2']:.3f}, relative residual by kind (median, p90) "
               + ", ".join(f"{k} {v[1]:+.1%} {v[2]:.1%}" for k, v in fit["residuals_by_kind"].items()))
    typer.echo(_profile_summary(prof))


@app.command()
def demo(
    profile_dir: Annotated[Path, typer.Option(help="where the quick profile is written")] = Path("data/profiles"),
    out: Annotated[Path, typer.Option(help="where report.md, the PNGs and the k8s/ files go")] = Path("out"),
) -> None:
    """The main job on embedded defaults: profile, batch, plan, tune and export; writes out/report.md."""
    from capsim.demo import run_demo

    run_demo(typer.echo, _output_dir(profile_dir, "--profile-dir"), _output_dir(out, "--out"))


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="CAPSIM_HOST", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="CAPSIM_PORT", min=1, max=65535, help="port to listen on")] = 8000,
    model: Annotated[str, typer.Option(envvar="CAPSIM_MODEL", help="reference model preset")] = "tiny",
    device: Annotated[str, typer.Option(envvar="CAPSIM_DEVICE", help="auto, cpu, cuda")] = "auto",
    dtype: Annotated[str, typer.Option(envvar="CAPSIM_DTYPE", help="float32, float16, bfloat16")] = "float32",
    max_batch_size: Annotated[int, typer.Option(envvar="CAPSIM_MAX_BATCH_SIZE")] = 32,
    max_wait_ms: Annotated[float, typer.Option(envvar="CAPSIM_MAX_WAIT_MS")] = 10.0,
    queue_capacity: Annotated[int, typer.Option(envvar="CAPSIM_QUEUE_CAPACITY")] = 1024,
    overflow: Annotated[str, typer.Option(envvar="CAPSIM_OVERFLOW", help="reject or wait")] = "reject",
    max_concurrent_batches: Annotated[int, typer.Option(envvar="CAPSIM_MAX_CONCURRENT_BATCHES")] = 1,
    redis_url: Annotated[str, typer.Option(envvar="CAPSIM_REDIS_URL", help="session store URL")] = "memory://",
    max_prompt_tokens: Annotated[int, typer.Option(envvar="CAPSIM_MAX_PROMPT_TOKENS")] = 2048,
    max_new_tokens: Annotated[int, typer.Option(envvar="CAPSIM_MAX_NEW_TOKENS")] = 512,
    drain_timeout_s: Annotated[float, typer.Option(envvar="CAPSIM_DRAIN_TIMEOUT_S", help="SIGTERM grace")] = 25.0,
    pod_name: Annotated[str | None, typer.Option(envvar="CAPSIM_POD_NAME", help="name in metrics and records")] = None,
    torch_threads: Annotated[int | None, typer.Option(envvar="CAPSIM_TORCH_THREADS", help="torch intra-op threads")] = None,
    slowdown: Annotated[float | None, typer.Option(
        envvar="CAPSIM_SLOWDOWN", help="a gray-failure drill: each batch or step holds the model this many times "
                                       "as long (faults.slow_pods in the simulator)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Run the agent pod: session turns through the batcher on the reference model, with /metrics."""
    from capsim.core.service import PodConfig
    from capsim.core.service import serve as run_server
    from capsim.model.settings import SettingsError

    try:
        # from_env: the settings without an option here (CAPSIM_BATCH_MODE and the engine's limits) too
        config = PodConfig.from_env(
            model=model, device=device, dtype=dtype, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
            queue_capacity=queue_capacity, overflow=overflow, max_concurrent_batches=max_concurrent_batches,
            redis_url=redis_url, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
            drain_timeout_s=drain_timeout_s, torch_threads=torch_threads, slowdown=slowdown,
            pod_name=pod_name,  # from_env drops None: the default name stands
        )
    except SettingsError as exc:  # checked before the model loads: name the option that was wrong
        field = str(exc).removeprefix("pod.").split(" ", 1)[0].split(".", 1)[0]
        raise typer.BadParameter(str(exc), param_hint=f"--{field.replace('_', '-')}") from None
    run_server(config, host=host, port=port, log_level=log_level)


@app.command()
def router(
    pod: Annotated[list[str] | None, typer.Option(help="a pod's base URL (repeat for each pod)")] = None,
    pods_from_dns: Annotated[str | None, typer.Option(
        help="instead of --pod: HOST:PORT of a headless Service; its addresses are the pods, looked up again "
             "every --refresh-s (so the router follows an HPA)")] = None,
    refresh_s: Annotated[float, typer.Option(help="--pods-from-dns: seconds between lookups")] = 5.0,
    policy: Annotated[str, typer.Option(help="session_affinity, round_robin, least_outstanding, prefix_aware")]
    = "session_affinity",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8080,
    timeout_s: Annotated[float, typer.Option(help="a turn's deadline at a pod (then 504)")] = 60.0,
    connect_timeout_s: Annotated[float, typer.Option(help="a pod not accepting by then is skipped")] = 1.0,
    down_s: Annotated[float, typer.Option(help="a pod that refused a connection is skipped this long")] = 5.0,
    outlier_ejection: Annotated[bool, typer.Option(
        help="least_outstanding and prefix_aware: eject a pod after consecutive failures, as Envoy's outlier "
             "detection (the simulator's router.outlier_ejection)")] = True,
    consecutive_failures: Annotated[int, typer.Option(help="failures in a row that eject a pod (Envoy's "
                                                           "consecutive_5xx)")] = 5,
    base_ejection_s: Annotated[float, typer.Option(help="an ejection lasts this long times the pod's "
                                                        "ejections")] = 30.0,
    max_ejection_s: Annotated[float, typer.Option(help="an ejection lasts at most this long (Envoy's "
                                                       "max_ejection_time)")] = 300.0,
    count_answered_5xx: Annotated[bool, typer.Option(
        help="count the 5xx a pod answers (Envoy's default); --no-count-answered-5xx: only refused, reset and "
             "timed-out turns")] = True,
    max_ejection_percent: Annotated[float, typer.Option(
        help="eject a pod only if then at most this % of the pods are out (Envoy's max_ejection_percent)")] = 10.0,
    always_eject_one_host: Annotated[bool, typer.Option(
        help="eject one pod while none is out, whatever --max-ejection-percent allows (Envoy 1.31+'s option, "
             "capsim's default); --no-always-eject-one-host: Envoy's default, which at 10 % ejects no pod of "
             "fewer than 10")] = True,
    ejection_interval_s: Annotated[float | None, typer.Option(
        help="Envoy's interval: an ejected pod returns at the first sweep (every this many seconds) after its "
             "ejection time, and sweeps lower its backoff, as Envoy's (10 there); unset: back at its ejection time, "
             "its backoff reset by a success (the simulator's router.outlier_ejection.interval_s)")] = None,
    max_ejection_time_jitter_s: Annotated[float, typer.Option(
        help="each ejection lasts up to this much longer, a whole number of milliseconds drawn at random (Envoy's "
             "max_ejection_time_jitter)")] = 0.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Run a router in front of real pods: places each session turn by a policy, fails over a dead pod."""
    from capsim.core.router import RouterConfig, serve_router
    from capsim.model.settings import SettingsError

    try:
        ejection = {"consecutive_failures": consecutive_failures, "base_ejection_s": base_ejection_s,
                    "max_ejection_s": max_ejection_s,
                    "count_answered_5xx": count_answered_5xx, "max_ejection_percent": max_ejection_percent,
                    "always_eject_one_host": always_eject_one_host,
                    "interval_s": ejection_interval_s,
                    "max_ejection_time_jitter_s": max_ejection_time_jitter_s} if outlier_ejection else None
        config = RouterConfig(pods=tuple(pod or ()), pods_from_dns=pods_from_dns, refresh_s=refresh_s,
                              policy=policy, timeout_s=timeout_s,  # type: ignore[arg-type]
                              connect_timeout_s=connect_timeout_s, down_s=down_s,
                              outlier_ejection=ejection)  # type: ignore[arg-type]
    except SettingsError as exc:
        field = str(exc).removeprefix("router.").split(" ", 1)[0].split(".", 1)[0]
        if field == "outlier_ejection":  # router.outlier_ejection.NAME: the option is NAME's
            field = str(exc).removeprefix("router.outlier_ejection.").split(" ", 1)[0]
            field = "ejection_interval_s" if field == "interval_s" else field
        hint = "--pod / --pods-from-dns" if field in ("", "router", "pods") else f"--{field.replace('_', '-')}"
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    serve_router(config, host=host, port=port, log_level=log_level)


def _profile_summary(prof: object) -> str:
    from capsim.model.profile import ServiceTimeProfile

    assert isinstance(prof, ServiceTimeProfile)
    frame = prof.to_frame()
    table = frame.pivot_table(index="batch_size", columns=["phase", "tokens"], values="p50_ms")
    text: str = table.round(3).to_string()
    return "median latency (ms) by batch size (rows) and phase/tokens (columns):\n" + text


@app.command()
def simulate(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (see data/scenarios/)")],
    seed: Annotated[int, typer.Option(min=0, help="root seed of the run's random streams")] = 0,
    out: Annotated[Path | None, typer.Option(help="write requests.csv, timeseries.csv, summary.json here")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    seeds: Annotated[int, typer.Option(min=1, help="run seeds --seed .. --seed+N-1 (in parallel) and print each "
                                                     "field's median, min and max; --out gets runs.csv")] = 1,
) -> None:
    """Simulate a scenario: print the summary; with --out, write the request and time-series frames."""
    import json
    import math

    from capsim.policy.keda import release_at_least
    from capsim.sim import simulate as run_simulation
    from capsim.sim.faults import merged_spans
    from capsim.studies.study_cli import load_scenario, run_seeds

    if out is not None:
        _output_dir(out, "--out")
    sc = load_scenario(scenario, set_ or ())
    if seeds > 1:
        run_seeds(sc, range(seed, seed + seeds), out, typer.echo)
        return
    result = run_simulation(sc, seed=seed)
    summary = result.summary.to_dict()
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    for row in result.skipped_crashes.itertuples():
        typer.echo(f"note: the crash scheduled at {row.time_s:g} s found no pod to crash: {row.why}")
    for row in result.skipped_slowdowns.itertuples():
        typer.echo(f"note: the slowdown scheduled at {row.time_s:g} s: {row.why}")
    for line in _slowdown_notes(result.slowdowns, result.requests):
        typer.echo(line)
    for line in _rollout_notes(result.rollouts, sc):
        typer.echo(line)
    for row in result.node_events.itertuples():  # when Kubernetes stopped replacing what died
        if row.event == "zone_state" and row.detail == "partial_disruption":
            typer.echo(f"note: at {row.time_s:g} s most of zone {row.zone}'s nodes were NotReady: the node lifecycle "
                       "controller evicts nothing more there while it is small (docs/simulator.md)")
        elif row.event == "master_disruption":
            typer.echo(f"note: at {row.time_s:g} s no node was Ready: the node lifecycle controller stopped every "
                       "eviction until one is")
        elif row.event == "autoscaler_halted":
            typer.echo(f"note: at {row.time_s:g} s cluster-autoscaler halted ({row.detail}): no node added or removed")
    for line in _drift_notes(result, sc):
        typer.echo(line)
    failed_ups = result.node_events[result.node_events["event"] == "scale_up_failed"]
    if len(failed_ups):  # faults.gpu_stockouts: the nodes the cloud did not create, and the backoffs after
        last = failed_ups.groupby("zone")["detail"].last().str.extract(r"until ([0-9.e+]+) s")[0]
        zones = ", ".join(f"zone {z} until {float(t):.0f} s" for z, t in last.items())
        n = len(failed_ups)
        typer.echo(f"note: {n} GPU node{'s' if n > 1 else ''} asked for {'were' if n > 1 else 'was'} not created "
                   f"(faults.gpu_stockouts), the first failure known at {failed_ups['time_s'].min():.0f} s; "
                   f"cluster-autoscaler backed the node groups off, last {zones} (node_events.csv, nodes.csv: "
                   "unfulfilled)")
    ev = result.scale_events
    keda = ev[ev["by"] == "keda"]
    if len(keda):  # KEDA's step to and from zero: when the first requests after a quiet spell waited
        down = ", ".join(f"{t:.0f}" for t in keda.loc[keda["to_replicas"] == 0, "time_s"]) or "never"
        up = ", ".join(f"{t:.0f}" for t in keda.loc[keda["from_replicas"] == 0, "time_s"]) or "never"
        typer.echo(f"note: KEDA took the Deployment to zero at {down} s and back at {up} s (scale_events.csv, by keda)")
    metrics_down = merged_spans((o.at_s, o.at_s + o.duration_s) for o in sc.faults.metrics_outages) if sc.faults else []
    keda_spec = sc.autoscaler.keda if sc.autoscaler is not None else None
    fb = keda_spec.fallback if keda_spec is not None else None
    if keda_spec is None:
        who = "the HPA read no metric"
    elif keda_spec.release == "2.16":
        who = (f"KEDA's polls (release 2.16) were in error and set its fallback, {fb.replicas} pods"
               if fb is not None and fb.replicas else
               "KEDA's polls (release 2.16) were in error (no fallback) and its HPA read no metric")
    elif fb is not None and fb.replicas == 0:
        who = (f"KEDA's polls were in error and, with a fallback of 0 replicas, idle ones (to zero a cooldown after "
               f"the last active poll); its HPA read the fallback after {fb.failure_threshold} failed reads")
    elif fb is not None:
        held = f"{fb.replicas} pods" if fb.behavior == "static" else f"{fb.behavior}, {fb.replicas} pods"
        who = (f"KEDA's polls were in error and changed nothing; its HPA read the fallback ({held}) after "
               f"{fb.failure_threshold} failed reads")
    else:
        who = "KEDA's polls were in error and changed nothing (no fallback); its HPA read no metric"

    def count_at(t: float) -> int:
        before = ev[ev["time_s"] <= t]
        return int(before["to_replicas"].iloc[-1]) if len(before) else sc.pods.replicas

    names = {m.name for m in sc.autoscaler.to_hpa().metrics} if sc.autoscaler is not None else set()
    for lo, hi in metrics_down:  # what the autoscalers did while Prometheus was down
        after = ""
        if keda_spec is not None and keda_spec.every_null_as_zero(list(names)):  # its first poll after, empty
            back = keda[(keda["time_s"] > hi) & (keda["time_s"] <= hi + keda_spec.polling_interval_s)
                        & (keda["to_replicas"] == 0)]
            if len(back):
                after = (f"; at its first poll after, {back['time_s'].iloc[0]:.0f} s, KEDA read the queries, empty "
                         "until Prometheus scraped afresh, as 0 (ignoreNullValues) and took it to zero "
                         "(capsim check: keda-empty-after-outage)")
        typer.echo(f"note: Prometheus was down from {lo:g} to {hi:g} s: {who}; the Deployment went from "
                   f"{count_at(lo)} to {count_at(hi)} pods meanwhile (scale_events.csv){after}")
    entries = sc.faults.trigger_outages if sc.faults else ()
    for o in entries:  # a partial outage: some metrics' own source down
        lo, hi = o.at_s, o.at_s + o.duration_s
        if set(o.metrics) >= names:  # every metric failed: as Prometheus down, to the autoscalers
            did = who
        elif keda_spec is None:
            did = "the HPA scaled on the other metrics, and never down while one failed"
        elif keda_spec.scaling_modifiers is not None:  # one composite: a failed trigger fails it
            fallen = (f", or past {fb.failure_threshold} failed reads the fallback's value"
                      + (" summed with the other triggers' (KEDA before 2.20)" if not release_at_least(keda_spec.release, "2.20") else "")
                      if fb is not None else "")
            did = ("KEDA's polls were in error and not active (scaling_modifiers: activity is the composite's), and "
                   f"its HPA read no composite metric{fallen}")
        else:
            did = ("KEDA's polls were in error, active when another trigger was"
                   + (" (release 2.16: noted as activity)" if keda_spec.release == "2.16" else
                      " (noted as no activity: the cooldown counts from before the outage)")
                   + ", and its HPA scaled on the other metrics, never down while one failed")
        typer.echo(f"note: {', '.join(o.metrics)} failed from {lo:g} to {hi:g} s (faults.trigger_outages): {did}; the "
                   f"Deployment went from {count_at(lo)} to {count_at(hi)} pods meanwhile (scale_events.csv)")
    syncs = result.hpa_syncs
    if keda_spec is not None and keda_spec.scaling_modifiers is not None and "composite-metric" in syncs:
        # reads whose triggers all answered but whose formula gave nothing (a failed run, a value not finite)
        triggers = [c for c in syncs.columns[3:] if not c.endswith(" proposal") and c != "composite-metric"]
        lost = syncs["composite-metric"].isna() & syncs[triggers].notna().all(axis=1)
        if lost.any():
            typer.echo(f"note: in {int(lost.sum())} of {len(syncs)} HPA syncs every trigger answered but the "
                       "scaling_modifiers formula gave no number (a failed run, or a value that is not finite): the "
                       "HPA read no composite metric and held its count (hpa_syncs.csv; capsim check: "
                       "keda-formula-idle)")
    for o in sc.total_trigger_outages():  # entries that each name some metrics, together all of them
        lo, hi = o.at_s, o.at_s + o.duration_s
        if any(e.at_s == lo and e.at_s + e.duration_s == hi and set(e.metrics) >= names for e in entries):
            continue  # one entry's outage of every metric: noted above
        typer.echo(f"note: every metric failed from {lo:g} to {hi:g} s (faults.trigger_outages together): {who}; the "
                   f"Deployment went from {count_at(lo)} to {count_at(hi)} pods meanwhile (scale_events.csv)")
    for w in result.wakes.itertuples():  # where a wake's wait went
        if math.isnan(w.first_request_s):
            continue
        node = "" if math.isnan(w.placed_s) else f"on a node after {w.placed_s - w.woke_s:.0f} s more and "
        started = w.woke_s if math.isnan(w.placed_s) else max(w.placed_s, w.woke_s)
        typer.echo(f"note: a request at {w.first_request_s:.0f} s found no pod: {w.by} woke the Deployment "
                   f"{w.woke_s - w.first_request_s:.0f} s later, its pod was {node}ready "
                   f"{w.ready_s - started:.0f} s after that; first token {w.waited_s:.0f} s after the request "
                   "(wakes.csv)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.requests.to_csv(out / "requests.csv", index=False)
        result.timeseries.to_csv(out / "timeseries.csv", index=False)
        result.scale_events.to_csv(out / "scale_events.csv", index=False)
        written = ["requests.csv", "timeseries.csv", "scale_events.csv"]
        if sc.cluster is not None:  # the GPU nodes, where each pod went, what was done about dead nodes
            result.nodes.to_csv(out / "nodes.csv", index=False)
            result.placements.to_csv(out / "placements.csv", index=False)
            result.node_events.to_csv(out / "node_events.csv", index=False)
            written += ["nodes.csv", "placements.csv", "node_events.csv"]
        if sc.autoscaler is not None:  # each sync of the HPA: what each metric read and proposed
            result.hpa_syncs.to_csv(out / "hpa_syncs.csv", index=False)
            written.append("hpa_syncs.csv")
        if sc.autoscaler is not None and sc.autoscaler.keda is not None:  # each poll of KEDA's operator
            result.keda_polls.to_csv(out / "keda_polls.csv", index=False)
            written.append("keda_polls.csv")
        if len(result.slowdowns):  # faults.slow_pods: which pods ran slow, when
            result.slowdowns.to_csv(out / "slowdowns.csv", index=False)
            written.append("slowdowns.csv")
        if len(result.crashes):  # each container crash: when, which pod, what kind (random, scheduled, rollout...)
            result.crashes.to_csv(out / "crashes.csv", index=False)
            written.append("crashes.csv")
        if len(result.rollouts):  # pods.rollouts: when each was done, the fewest ready and most pods meanwhile
            result.rollouts.to_csv(out / "rollouts.csv", index=False)
            written.append("rollouts.csv")
        if len(result.wakes):  # each step from zero pods
            result.wakes.to_csv(out / "wakes.csv", index=False)
            written.append("wakes.csv")
        (out / "summary.json").write_text(json.dumps(
            {"summary": summary, "provenance": result.provenance}, indent=2, default=str))
        typer.echo(f"wrote {out}/{', '.join(written)}, summary.json")


def _drift_notes(result: Any, sc: Any) -> list[str]:
    """What Karpenter's drift did (``cluster.karpenter.drift_at_s``): the drifted nodes replaced by the end, the
    last one's removal, and the commands that failed or were blocked."""
    k = sc.cluster.karpenter if sc.cluster is not None else None
    if k is None or not k.drift_at_s:
        return []
    nodes = result.nodes[~result.nodes["unfulfilled"]]
    drifted = [row for row in nodes.itertuples()
               if (t := k.drifted_s(row.created_s)) is not None and t <= sc.horizon_s]
    if not drifted:
        return []
    gone = [row.removed_s for row in drifted if row.removed_s == row.removed_s]  # not NaN
    ev = result.node_events
    failed = int((ev["event"] == "drift_failed").sum())
    blocked = ev.loc[ev["event"] == "drift_blocked", "detail"].str.extract(r"^node (\d+)")[0].nunique()
    when = ", ".join(f"{t:g}" for t in k.drift_at_s)
    line = (f"note: the node template changed at {when} s (cluster.karpenter.drift_at_s): Karpenter replaced "
            f"{len(gone)} of {len(drifted)} drifted node(s)"
            + (f", the last gone at {max(gone):.0f} s" if gone else ""))
    if failed:
        line += f"; {failed} command(s) failed, a replacement not created or not ready in time"
    if blocked:
        line += (f"; {blocked} node(s) could not be replaced for a while (drift_blocked: the GPU limit, or no zone "
                 "could take a new node)")
    return [line + " (node_events.csv: drift, drift_blocked, drift_failed)"]


def _rollout_notes(rollouts: Any, sc: Any) -> list[str]:
    """One line per rolling update (``pods.rollouts``, undos too): how long it took, that it was undone first, or
    that it never finished, and the fewest pods ready and the most alive (Pending, starting, ready or draining)
    while it ran."""
    import math

    ru = sc.pods.rolling_update
    how = ("Recreate" if sc.pods.strategy == "Recreate"
           else f"maxSurge {ru.max_surge}, maxUnavailable {ru.max_unavailable}")
    from capsim.studies.checks import early_canary_checks

    early = early_canary_checks(sc)  # the resumes whose first measurement reads the canary's first requests
    resumes = sorted((ro.at_s, i) for i, ro in enumerate(sc.pods.rollouts) if ro.resume)
    out = []
    for r in rollouts.itertuples():
        what = "the undo (kubectl rollout undo)" if r.undo else "the rollout"
        head = f"note: {what} at {r.at_s:g} s ({how}, {r.pods:.0f} pods then)"
        stalled = ("" if math.isnan(r.deadline_exceeded_s) else
                   f"; Kubernetes reports it stalled (ProgressDeadlineExceeded, {sc.pods.progress_deadline_s} s without "
                   f"progress: `kubectl rollout status` fails) at {r.deadline_exceeded_s:g} s")
        if math.isnan(r.done_s) and not math.isnan(r.undone_s):
            out.append(f"{head} was undone at {r.undone_s:g} s, {r.undone_s - r.at_s:g} s after it began, before it was "
                       f"done: {r.min_ready:.0f} pods ready at the fewest, {r.most_pods:.0f} alive at the most{stalled} "
                       "(rollouts.csv; a broken template's crashes are crashes.csv's kind rollout)")
        elif math.isnan(r.done_s):
            why = ("old pods still draining, or new ones still starting or Pending" if sc.pods.strategy == "Recreate"
                   else "new pods still starting, or a surge pod with no GPU to take (Pending) while maxUnavailable "
                   "keeps every old one")
            out.append(f"{head} was not done by the end of the run, {sc.horizon_s - r.at_s:g} s after it began: "
                       f"{why} (docs/simulator.md, \"Rolling updates\"); {r.min_ready:.0f} pods ready at the "
                       f"fewest, {r.most_pods:.0f} alive at the most{stalled} (rollouts.csv)")
        else:
            out.append(f"{head} took {r.done_s - r.at_s:g} s: {r.min_ready:.0f} pods ready at the fewest, "
                       f"{r.most_pods:.0f} alive at the most{stalled} (rollouts.csv)")
        if not math.isnan(r.canary_checked_s):
            reads = []
            if not (math.isnan(r.canary_ttft_p99_s) and math.isnan(r.baseline_ttft_p99_s)):
                reads.append(f"its pods' p99 TTFT {r.canary_ttft_p99_s:.3g} s against the old pods' "
                             f"{r.baseline_ttft_p99_s:.3g} s")
            if not (math.isnan(r.canary_itl_mean_s) and math.isnan(r.baseline_itl_mean_s)):
                whose = "their" if reads else "its pods'"
                reads.append(f"{whose} mean inter-token latency {r.canary_itl_mean_s * 1e3:.3g} ms against the old "
                             f"pods' {r.baseline_itl_mean_s * 1e3:.3g} ms")
            if not (math.isnan(r.canary_error_rate) and math.isnan(r.baseline_error_rate)):
                whose = "their" if reads else "its pods'"
                reads.append(f"{whose} error rate {r.canary_error_rate:.2%} against the old pods' "
                             f"{r.baseline_error_rate:.2%}")
            # the resume whose check it was: the first at or after the check (a check during the pause comes before)
            i = next((i for at, i in resumes if at >= r.canary_checked_s), None)
            ro = None if i is None else sc.pods.rollouts[i]
            many = ro is not None and ro.check_interval_s is not None
            read = (f": {' and '.join(reads)} over the {'last measurement' if many else 'check'}'s window"
                    if reads else "")
            verdict = f"failed on {r.canary_failed_by}: resumed and undone" if r.canary_failed else "passed: resumed"
            limit = f"{r.canary_failures} of {r.canary_measurements} measurements failed a limit, " + (
                f"each limit's failure limit {ro.check_failure_limit}" if ro is not None else "")
            if ro is not None and r.canary_checked_s != ro.at_s:
                verdict += (" by the pipeline's restart poll during the pause (a restart of its pods)"
                            if r.canary_failed_by == "undo_if_restarted"
                            else f" by the pipeline's analysis during the pause ({limit})")
            elif many:
                verdict += f" ({limit})"
            whose = "measurements'" if many else "check's"
            caveat = (f"; its {whose} window began before the canary's pods "
                      "could all be ready, so it read their first requests, the router's treatment of new pods as much "
                      "as the version (capsim check: canary-window-before-ready)"
                      if i in early and r.canary_measurements else "")
            out.append(f"note: the canary check of the rollout at {r.at_s:g} s, at {r.canary_checked_s:g} s, "
                       f"{verdict}{read}{caveat} (rollouts.csv)")
        if not math.isnan(r.undo_refused_s):
            out.append(f"note: the deploy pipeline's undo at {r.undo_refused_s:g} s was refused: the Deployment was "
                       "paused (kubectl: \"you cannot rollback a paused deployment; resume it first\"), and the "
                       f"rollout at {r.at_s:g} s stayed as it was (pods.rollouts' pause)")
    return out


def _slowdown_notes(slowdowns: Any, requests: Any) -> list[str]:
    """One line per spell of ``faults.slow_pods``: what the requests sent while it lasted waited for their first
    token (all of them, those the slow pods answered, those the other pods answered at the first attempt: a
    retry of a slow pod's timeout lands on another pod), and the slow pods' share of them."""
    import numpy as np

    def p99(ttft: Any) -> str:
        return f"{float(np.percentile(ttft, 99)):.3g} s" if len(ttft) else "none"

    lines = []
    spells = slowdowns.groupby(["start_s", "end_s", "factor"], sort=False)["pod"].apply(list)
    if len(spells) > 4 and (slowdowns["pod"] >= 0).all():  # many spells (faults.random_slowdowns): one line
        ok = requests[requests["outcome"] == "ok"]
        slow = np.zeros(len(ok), dtype=bool)
        pod, start = ok["pod"].to_numpy(), ok["start_s"].to_numpy()
        for row in slowdowns.itertuples():
            slow |= (pod == row.pod) & (start >= row.start_s) & (start < row.end_s)
        ttft = (ok["first_token_s"] - ok["arrival_s"]).to_numpy()
        return [f"note: {len(slowdowns)} slow spells on {slowdowns['pod'].nunique()} pods: {slow.mean():.1%} of the "
                f"requests answered started in one, TTFT p99 {p99(ttft[slow])} there, {p99(ttft[~slow])} elsewhere "
                "(slowdowns.csv)"]
    for (start, end, factor), pods in spells.items():
        sent = requests[(requests["arrival_s"] >= start) & (requests["arrival_s"] < end)]
        ok = sent[sent["outcome"] == "ok"]
        ttft = ok["first_token_s"] - ok["arrival_s"]
        until = "the end" if end == float("inf") else f"{end:g} s"
        if pods == [-1]:
            lines.append(f"note: every pod ran {factor:g}x slow from {start:g} s to {until}: TTFT p99 {p99(ttft)} "
                         f"over the {len(ok)} requests sent then and answered (slowdowns.csv)")
            continue
        on = ok["pod"].isin(pods)
        first = ~on & (ok["attempts"] == 1)
        share = float(sent["pod"].isin(pods).mean()) if len(sent) else float("nan")
        which = f"pod {pods[0]}" if len(pods) == 1 else "pods " + ", ".join(str(p) for p in pods)
        lines.append(f"note: {which} ran {factor:g}x slow from {start:g} s to {until}, ready throughout; of the "
                     f"requests sent then (TTFT p99 {p99(ttft)}) {'it' if len(pods) == 1 else 'they'} took "
                     f"{share:.0%} (last attempts), TTFT p99 {p99(ttft[on])}; the other pods' first attempts "
                     f"{p99(ttft[first])} (slowdowns.csv)")
    return lines


@app.command()
def loadgen(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML whose workload (and client section) to replay")],
    target: Annotated[list[str], typer.Option(help="pod base URL; repeat for several pods")] = ["http://127.0.0.1:8000"],  # noqa: B006
    seed: Annotated[int, typer.Option(help="seed of the workload's random streams (as in simulate)")] = 0,
    max_requests: Annotated[int, typer.Option(help="stop after this many requests")] = 1000,
    max_duration_s: Annotated[float, typer.Option(
        help="end the whole run, requests in flight included, after this many seconds")] = 60.0,
    routing: Annotated[str, typer.Option(help="round_robin, random or session_affinity")] = "round_robin",
    stream: Annotated[bool, typer.Option(help="stream tokens (measures time to first token on the client)")] = False,
    allow_remote: Annotated[bool, typer.Option(help="allow targets that are not on loopback")] = False,
    pod_clock: Annotated[bool, typer.Option(
        help="pods on this host: place their timings on this host's clock, so the time to first token counts "
             "from the send (the way into the pod included), as the simulator's does")] = False,
    out: Annotated[Path | None, typer.Option(help="write the request records to this CSV")] = None,
) -> None:
    """Replay a scenario's workload against real pods, open loop; records use the simulator's columns."""
    import asyncio

    from capsim.core.loadgen import ClientPolicy, LoadgenError, generator_saturated, off_pod_clock, run_load
    from capsim.model.scenario import Scenario
    from capsim.model.settings import SettingsError
    from capsim.sim.arrivals import make_workload
    from capsim.sim.streams import Streams

    if routing not in ("round_robin", "random", "session_affinity"):
        raise typer.BadParameter(f"--routing must be round_robin, random or session_affinity, got {routing!r}")
    try:
        sc = Scenario.from_yaml(scenario)
        workload = make_workload(sc, Streams(seed))
        c = sc.client
        frame = asyncio.run(run_load(
            target, workload, client=ClientPolicy(c.timeout_s, c.max_retries, c.backoff_s, c.backoff_multiplier,
                                                  c.backoff_jitter),
            routing=routing,  # type: ignore[arg-type]
            max_requests=max_requests, max_duration_s=max_duration_s, stream=stream,
            allow_remote=allow_remote, seed=seed, progress=True, pod_clock=pod_clock,
        ))
    except (SettingsError, LoadgenError) as exc:
        raise typer.BadParameter(str(exc)) from None
    ok = frame[frame.outcome == "ok"]
    ttft = (ok.first_token_s - ok.arrival_s).quantile([0.5, 0.99])
    e2e = (ok.end_s - ok.arrival_s).quantile([0.5, 0.99])
    typer.echo(f"requests {len(frame)}, ok {len(ok)}, outcomes {frame.outcome.value_counts().to_dict()}")
    failures = frame.attrs.get("failures", {})
    if failures:
        typer.echo("failed attempts by reason: " + ", ".join(f"{why} {n}" for why, n in failures.items()))
    off = off_pod_clock(frame) if pod_clock and not stream else None
    if off is not None:
        typer.echo(f"WARNING: {off}")
    busy = generator_saturated(frame)
    if busy is not None:
        typer.echo(f"WARNING: {busy}")
    if len(ok):
        typer.echo(f"ttft p50 {ttft.iloc[0] * 1000:.1f} ms, p99 {ttft.iloc[1] * 1000:.1f} ms; "
                   f"e2e p50 {e2e.iloc[0] * 1000:.1f} ms, p99 {e2e.iloc[1] * 1000:.1f} ms")
    if out is not None:
        frame.to_csv(out, index=False)
        typer.echo(f"wrote {out}")


@app.command()
def validate(
    quick: Annotated[bool, typer.Option(help="two load levels, 900 requests each")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        help="where results.csv, validation.png, provenance.json and service.yaml (the calibrated pod as a scenario fragment) go [default: data/validation, kept unless --force]")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite the results in the default folder")] = False,
    requests_per_level: Annotated[int | None, typer.Option(
        min=1, help="requests per load level, split among the replications [default: as many as 290 s of runs take at the measured capacity]")] = None,
    replications: Annotated[int | None, typer.Option(
        min=1, help="runs per load level with different seeds (intervals need 3 or more) [default: 3]")] = None,
    prompt_tokens: Annotated[int | None, typer.Option(min=1, help="prompt tokens of every request")] = None,
    output_tokens: Annotated[int | None, typer.Option(min=1, help="output tokens of every request")] = None,
    mode: Annotated[str, typer.Option(help="static batches, continuous batching (docs/continuous.md), or growing "
                                      "sessions on two pods per router policy (docs/sessions.md)")] = "static",
    policies: Annotated[str | None, typer.Option(
        help="--mode sessions: router policies, comma-separated [default: session_affinity,round_robin]")] = None,
    noise_block_steps: Annotated[int | None, typer.Option(
        min=0, help="--mode continuous: steps the simulator walks the measured step factors in a row; 1: each "
        "step at random, 0: no step spread [default: 64]")] = None,
    level: Annotated[float | None, typer.Option(
        min=0.01, max=1.0, help="--mode sessions: the session rate as a share of the fleet's capacity without "
        "prefix hits [default: 0.5]")] = None,
    probe_s: Annotated[float | None, typer.Option(
        min=0.0, help="--mode sessions: seconds of each policy's fleet probe, which sizes the rate to the fleet "
        "and is simulated beside the calibration; 0: none, the rate from the calibration alone [default: 6]. "
        "--mode continuous: seconds of each of the two probes before a run, simulated beside it; 0: none "
        "[default: 2]")] = None,
    crash_at: Annotated[float | None, typer.Option(
        min=0.0, help="--mode sessions: seconds into each policy's last run at which its second pod is killed (the "
        "crash run, crash.csv); 0: no crash run [default: 10; --quick: 4]")] = None,
    ttft_from_receipt: Annotated[bool, typer.Option(
        help="--mode continuous: count the real and simulated TTFT from the pod's receipt, without the way in "
        "(as before stop 30; by default both count from the client's send)")] = False,
    from_runs: Annotated[Path | None, typer.Option(
        help="simulate again the real runs that an earlier static validation kept in DIR/runs, with its "
        "profile and calibration (no pod; about 50 s for a default run), writing the results to --out-dir [default: "
        "DIR/resimulated]")] = None,
) -> None:
    """Measure this machine, run the real pod at 30/60/85% load and the simulator on the same workload."""
    from dataclasses import replace

    if mode not in ("static", "continuous", "sessions"):
        raise CommandLineError(f"--mode must be static or continuous, or sessions, got {mode!r}")
    if from_runs is not None:
        refused = [name for name, v in (("--quick", quick or None), ("--force", force or None),
                                      ("--requests-per-level", requests_per_level), ("--replications", replications),
                                      ("--prompt-tokens", prompt_tokens), ("--output-tokens", output_tokens))
                 if v is not None]
        if mode != "static" or refused:
            raise CommandLineError("--from-runs simulates a static validation's kept runs as they were: it takes "
                                   "--out-dir only" + (f", not {', '.join(refused)}" if refused else ""))
        _resimulate(from_runs, out_dir)
        return
    for name, on in (("--noise-block-steps", noise_block_steps is not None), ("--ttft-from-receipt", ttft_from_receipt)):
        if on and mode != "continuous":
            raise CommandLineError(f"{name} applies to --mode continuous only")
    for name, given in (("--level", level), ("--policies", policies), ("--crash-at", crash_at)):
        if given is not None and mode != "sessions":
            raise CommandLineError(f"{name} applies to --mode sessions only")
    if probe_s is not None and mode == "static":
        raise CommandLineError("--probe-s applies to --mode sessions and --mode continuous only")
    if mode == "continuous":
        _validate_continuous(quick, out_dir, force, noise_block_steps, probe_s, ttft_from_receipt)
        return
    if mode == "sessions":
        _validate_sessions(quick, out_dir, force, replications, policies, level, probe_s, crash_at)
        return
    from capsim.studies.validate import ValidationSpec, run_validation, worst_errors

    # every argument is checked here, before the 20 s of profiling
    folder = _output_dir(out_dir if out_dir is not None else Path("data/validation"), "--out-dir")
    existing = [p.name for p in (folder / "results.csv", folder / "provenance.json") if p.exists()]
    if existing and out_dir is None and not force:
        raise CommandLineError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them, "
                               "or --out-dir to write elsewhere")
    spec = ValidationSpec.quick() if quick else ValidationSpec()
    changes: dict[str, Any] = {k: v for k, v in {"requests_per_level": requests_per_level, "prompt_tokens": prompt_tokens,
                                 "output_tokens": output_tokens, "replications": replications}.items() if v is not None}
    spec = replace(spec, **changes)
    _check_validation_lengths(spec.model, spec.prompt_tokens, spec.output_tokens)
    results = run_validation(spec, out_dir=folder, echo=typer.echo)
    worst = worst_errors(results)
    typer.echo("worst relative error per metric: " + ", ".join(f"{k} {v:.1%}" for k, v in worst.items()))
    typer.echo(f"wrote {folder}/results.csv, validation.png, provenance.json")


def _resimulate(from_runs: Path, out_dir: Path | None) -> None:
    """``capsim validate --from-runs DIR``: the simulated side again on the kept real runs."""
    from capsim.studies.validate import resimulate, worst_errors

    folder = _output_dir(out_dir if out_dir is not None else from_runs / "resimulated", "--out-dir")
    if folder.resolve() == from_runs.resolve():
        raise CommandLineError("--out-dir must differ from --from-runs: the measured results stay as they were")
    results = resimulate(from_runs, folder, echo=typer.echo)  # a KeptRunsError names the file
    worst = worst_errors(results)
    typer.echo("worst relative error per metric: " + ", ".join(f"{k} {v:.1%}" for k, v in worst.items()))
    typer.echo(f"wrote {folder}/results.csv, validation.png, provenance.json")


def _validate_continuous(quick: bool, out_dir: Path | None, force: bool, noise_block_steps: int | None = None,
                         probe_s: float | None = None, ttft_from_receipt: bool = False) -> None:
    """``capsim validate --mode continuous`` (capsim.studies.validate_continuous)."""
    from dataclasses import replace

    from capsim.studies.validate_continuous import ContinuousSpec, run_continuous_validation

    folder = _output_dir(out_dir if out_dir is not None else Path("data/validation/continuous"), "--out-dir")
    existing = [p.name for p in (folder / "results.csv", folder / "provenance.json") if p.exists()]
    if existing and out_dir is None and not force:
        raise CommandLineError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them, "
                               "or --out-dir to write elsewhere")
    spec = ContinuousSpec.quick() if quick else ContinuousSpec()
    if noise_block_steps is not None:
        spec = replace(spec, cycle_noise=noise_block_steps > 0, noise_block_steps=max(noise_block_steps, 1))
    if probe_s is not None:
        spec = replace(spec, probe_s=probe_s)
    spec = replace(spec, ttft_from_send=not ttft_from_receipt)
    run_continuous_validation(spec, out_dir=folder, echo=typer.echo)
    typer.echo(f"wrote {folder}/results.csv, profile.csv, provenance.json, service.yaml")


def _validate_sessions(quick: bool, out_dir: Path | None, force: bool, replications: int | None,
                       policies: str | None, level: float | None = None, probe_s: float | None = None,
                       crash_at: float | None = None) -> None:
    """``capsim validate --mode sessions`` (capsim.studies.validate_sessions)."""
    from dataclasses import replace

    from capsim.core.router import POLICIES
    from capsim.studies.validate_sessions import SessionsSpec, run_sessions_validation

    spec = SessionsSpec.quick() if quick else SessionsSpec()
    if policies is not None:
        names = tuple(p.strip() for p in policies.split(",") if p.strip())
        bad = [p for p in names if p not in POLICIES]
        if bad or not names:
            raise CommandLineError(f"--policies must name router policies ({', '.join(POLICIES)}), got {policies!r}")
        spec = replace(spec, policies=names)
    if replications is not None:
        spec = replace(spec, replications=replications)
    if level is not None:
        spec = replace(spec, level=level)
    if probe_s is not None:
        spec = replace(spec, probe_s=probe_s)
    if crash_at is not None:
        if crash_at >= spec.arrival_s:
            raise CommandLineError(f"--crash-at must fall while sessions arrive (before {spec.arrival_s:g} s), "
                                   f"got {crash_at:g}")
        spec = replace(spec, crash_at_s=crash_at)

    folder = _output_dir(out_dir if out_dir is not None else Path("data/validation/sessions"), "--out-dir")
    existing = [p.name for p in (folder / "results.csv", folder / "provenance.json") if p.exists()]
    if existing and out_dir is None and not force:
        raise CommandLineError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them, "
                               "or --out-dir to write elsewhere")
    run_sessions_validation(spec, out_dir=folder, echo=typer.echo)
    typer.echo(f"wrote {folder}/results.csv, replications.csv, profile.csv, provenance.json, service.yaml"
               + (", crash.csv" if spec.crash_at_s > 0 else ""))


def _check_validation_lengths(model: str, prompt_tokens: int, output_tokens: int) -> None:
    """The pod the validation starts answers 413 past its default limits; say so before profiling."""
    from capsim.core.engine import PRESETS
    from capsim.core.service import PodConfig

    limits = {"--prompt-tokens": (prompt_tokens, PodConfig.model_fields["max_prompt_tokens"].default),
              "--output-tokens": (output_tokens, PodConfig.model_fields["max_new_tokens"].default)}
    for option, (value, most) in limits.items():
        if value > most:
            raise CommandLineError(f"{option} must be <= {most} (the validated pod's limit), got {value}")
    most = (PRESETS[model].max_seq_len - 1) // 2  # the validation profiles contexts up to twice the request's
    if prompt_tokens + output_tokens > most:
        raise CommandLineError(f"--prompt-tokens + --output-tokens must be <= {most} (the validation profiles "
                               f"contexts up to twice that; model {model} holds {PRESETS[model].max_seq_len} "
                               f"tokens), got {prompt_tokens + output_tokens}")


def _executor_spec(dask: str | None, workers: int | None) -> str | None:
    if dask:
        return dask
    return f"processes:{workers}" if workers else None


@app.command()
def sweep(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (see data/scenarios/)")],
    grid: Annotated[Path, typer.Option(help="grid YAML: dotted paths to lists of values (data/studies/)")],
    seeds: Annotated[int, typer.Option(help="replications per setting (seeds 0..N-1)")] = 3,
    out: Annotated[Path, typer.Option(help="folder for runs.csv, settings.csv, provenance.json")] = Path("sweep-out"),
    dask: Annotated[str | None, typer.Option(help="local:N starts a Dask LocalCluster; tcp://host:8786 uses one")] = None,
    workers: Annotated[int | None, typer.Option(help="local worker processes (default: every core)")] = None,
    cache: Annotated[bool, typer.Option(help="reuse results from .capsim/cache/")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Simulate every setting of a grid under every seed; write one row per run and one per setting."""
    from capsim.studies.study_cli import load_scenario, run_sweep

    run_sweep(load_scenario(scenario, set_ or ()), grid, seeds, _output_dir(out, "--out"),
              _executor_spec(dask, workers), cache, typer.echo)


@app.command()
def capacity(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML; its arrivals become a steady Poisson rate")],
    replicas: Annotated[int | None, typer.Option(help="fixed fleet size (default: the scenario's)")] = None,
    seeds: Annotated[int, typer.Option(help="every seed must meet the SLO at a rate")] = 1,
    horizon_s: Annotated[float | None, typer.Option(help="simulated seconds per probe (default: the scenario's)")] = None,
    rel_tol: Annotated[float, typer.Option(help="stop when the bracket is narrower than this fraction")] = 0.02,
    grid: Annotated[Path | None, typer.Option(help="a sweep grid YAML: one capacity per setting")] = None,
    cache: Annotated[bool, typer.Option(help="reuse results from .capsim/cache/")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """The highest arrival rate a pod (or --replicas N pods) sustains within the SLO, by bisection."""
    from capsim.studies.study_cli import load_scenario, run_capacity

    run_capacity(load_scenario(scenario, set_ or ()), replicas, seeds, horizon_s, rel_tol, cache, typer.echo,
                 grid=grid)


@app.command()
def headroom(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML: its own traffic, autoscaler, cluster and faults")],
    seeds: Annotated[int, typer.Option(min=1, help="every seed must meet the SLO at a multiple")] = 1,
    rel_tol: Annotated[float, typer.Option(help="stop when the bracket is narrower than this fraction")] = 0.02,
    cache: Annotated[bool, typer.Option(help="reuse results from .capsim/cache/")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """How many times its own traffic (the rush, the trace) a plan carries within its SLO, by bisection on
    workload.load_scale."""
    from capsim.studies.study_cli import load_scenario, run_headroom

    run_headroom(load_scenario(scenario, set_ or ()), seeds, rel_tol, cache, typer.echo)


@app.command("pod-shapes")
def pod_shapes(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML with the rush (its SLO decides)")] = Path(
        "data/scenarios/h100x4_llama3_70b_rush.yaml"),
    model: Annotated[str, typer.Option(help="a roofline preset or a Hugging Face config.json")] = "llama-3-70b",
    shape: Annotated[list[str] | None, typer.Option(
        help="GPU:TP:PRICE[:PROFILE], a pod of TP GPUs at PRICE a GPU-hour, timed by a roofline estimate or by the "
             "PROFILE measured on such a pod; repeat [default: h100:4:4, h100:8:4, h200:2:5]")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds 0..N-1, a fleet found for each")] = 5,
    max_pods: Annotated[int, typer.Option(min=1, help="the largest fleet tried")] = 32,
    out: Annotated[Path | None, typer.Option(help="folder for shapes.csv, shapes.png and the estimated profiles")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP + " (a node failure at the peak: "
                                                   "--set 'faults.node_failures=[{at_s: 600}]')")] = None,
) -> None:
    """The fewest pods of each shape (GPU x tensor parallelism) that carry the scenario's rush within its SLO,
    from roofline-estimated (or measured) step times: GPUs held and billed by whole nodes, cost an hour
    (docs/continuous.md)."""
    import tempfile

    from capsim.studies.pod_shapes import DEFAULT_SHAPES, compare_pod_shapes, format_shapes, parse_shape
    from capsim.studies.study_cli import load_scenario

    shapes = [parse_shape(s) for s in shape] if shape else list(DEFAULT_SHAPES)
    folder = _output_dir(out, "--out") if out is not None else None
    sc = load_scenario(scenario, set_ or ())
    with tempfile.TemporaryDirectory() as tmp:
        profiles = folder if folder is not None else Path(tmp)
        profiles.mkdir(parents=True, exist_ok=True)
        frame = compare_pod_shapes(sc, shapes, model, profile_dir=profiles, seeds=range(seeds), max_pods=max_pods)
    typer.echo(format_shapes(frame))
    for name, g in frame.groupby("shape", sort=False):
        typer.echo(f"{name}: pods by seed {dict(zip(g['seed'], g['pods'], strict=True))}")
    if folder is not None:
        from capsim import plots

        frame.to_csv(folder / "shapes.csv", index=False)
        plots.save(plots.pod_shapes(frame), folder / "shapes.png")
        typer.echo(f"wrote {folder / 'shapes.csv'}, {folder / 'shapes.png'}")


@app.command()
def tune(
    scenario: Annotated[Path | None, typer.Argument(help="scenario YAML (default: the one the space file names)")] = None,
    space: Annotated[Path, typer.Option(help="space YAML: params with choices or ranges, and stresses")] = Path(
        "data/studies/friday_space.yaml"),
    out: Annotated[Path, typer.Option(help="folder for best.yaml, trials.csv, front.csv, front.png")] = Path("tune-out"),
    seeds: Annotated[int | None, typer.Option(help="seeds every candidate must pass (default: the space's, or 3)")] = None,
    budget: Annotated[int | None, typer.Option(help="settings to try (default: the space's)")] = None,
    objective: Annotated[str | None, typer.Option(help="cost or ttft (default: the space's, or cost)")] = None,
    stress: Annotated[list[str] | None, typer.Option(help="only these stresses of the space file; repeat")] = None,
    dask: Annotated[str | None, typer.Option(help="local:N starts a Dask LocalCluster; tcp://host:8786 uses one")] = None,
    workers: Annotated[int | None, typer.Option(help="local worker processes (default: every core)")] = None,
    sampler_seed: Annotated[int, typer.Option(help="seed of the search itself")] = 0,
    cache: Annotated[bool, typer.Option(help="reuse results from .capsim/cache/")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP + "; on the base scenario")] = None,
) -> None:
    """Find the cheapest settings that meet the SLO under every stress and seed; write best.yaml and the trials."""
    from capsim.studies.study_cli import run_tune

    run_tune(scenario, space, _output_dir(out, "--out"), seeds=seeds, budget=budget, objective=objective,
             stresses=stress or [], executor=_executor_spec(dask, workers), sampler_seed=sampler_seed, cache=cache,
             echo=typer.echo, sets=set_ or ())


@app.command()
def check(
    scenarios: Annotated[list[Path], typer.Argument(help="scenario YAMLs (or a tune's best.yaml)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP + "; on every scenario")] = None,
) -> None:
    """Check scenarios for settings that cannot work; print each finding with its field path.

    Exit code 1 when any check fails (warnings do not fail), so CI can gate on it.
    """
    from capsim.studies.checks import failed, format_findings, run_checks
    from capsim.studies.study_cli import load_scenario

    # a bad scenario: the error policy's one line, exit 2
    results = [(path, run_checks(load_scenario(path, set_ or ()))) for path in scenarios]
    for path, findings in results:
        if len(results) > 1:
            typer.echo(f"== {path}")
        typer.echo(format_findings(findings))
    if any(failed(findings) for _, findings in results):
        raise typer.Exit(1)


@app.command()
def export(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML (or a tune's best.yaml)")],
    out: Annotated[Path, typer.Option(help="folder to write the YAML files and README.md into")],
    name: Annotated[str, typer.Option(help="the Deployment (and its container) to patch and scale")] = "capsim-agent",
    namespace: Annotated[str, typer.Option(help="the Deployment's namespace")] = "default",
    container: Annotated[str | None, typer.Option(help="container name in the Deployment (default: --name)")] = None,
    port: Annotated[int, typer.Option(help="port the pod serves on")] = 8000,
    redis_url: Annotated[str, typer.Option(help="session store the pods use (state.store: redis)")] = "redis://redis:6379/0",
    prometheus_url: Annotated[str, typer.Option(help="Prometheus server KEDA queries")] = (
        "http://prometheus-operated.monitoring.svc:9090"),
    adapter_namespace: Annotated[str, typer.Option(help="namespace of prometheus-adapter")] = "monitoring",
    gateway_query: Annotated[str | None, typer.Option(
        help="PromQL of the requests sent to the Deployment's Service, answered or not, for a KEDA trigger on "
             "capsim_gateway_requests_total ($name, $namespace, $service, $window are filled in; default: "
             "Istio's istio_requests_total as the clients' sidecars report it)")] = None,
    dcgm_honor_labels: Annotated[bool, typer.Option(
        help="Prometheus scrapes dcgm-exporter with honorLabels: true, so its DCGM_FI_* series name the GPU's pod "
             "in namespace and pod (default: exported_namespace and exported_pod, as with its Helm chart's "
             "default)")] = False,
    seed: Annotated[int, typer.Option(help="seed of the simulation whose numbers the README reports")] = 0,
    simulate: Annotated[bool, typer.Option(help="simulate the scenario for the README's numbers")] = True,
    summary: Annotated[Path | None, typer.Option(
        help="take the README's numbers from this summary.json (capsim simulate --out) instead")] = None,
    force: Annotated[bool, typer.Option(help="write even when a check fails")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP + "; what is exported and simulated")] = None,
) -> None:
    """Write hpa.yaml, configmap.yaml, deployment-patch.yaml, prometheus-adapter.yaml, keda-scaledobject.yaml
    (with autoscaler.keda: the ScaledObject without hpa.yaml and the adapter's rules), the router's file (destinationrule.yaml or inferencepool.yaml), pdb.yaml and vllm-args.yaml where they
    apply, and README.md for a scenario; `capsim check` runs first and a failure stops the export unless
    --force."""
    import json

    from capsim.export import ChecksFailedError, DeployTarget, export_scenario, simulated_numbers
    from capsim.studies.checks import failed, format_findings, run_checks
    from capsim.studies.study_cli import load_scenario

    # bad options, a bad scenario or an unreadable --summary: the error policy's one line, exit 2
    target = DeployTarget(name=name, namespace=namespace, container=container, port=port, redis_url=redis_url,
                          prometheus_url=prometheus_url, adapter_namespace=adapter_namespace,
                          dcgm_honor_labels=dcgm_honor_labels,
                          **({"gateway_query": gateway_query} if gateway_query is not None else {}))
    scen = load_scenario(scenario, set_ or ())
    _output_dir(out, "--out")
    numbers = None
    if summary is not None:
        try:
            numbers = json.loads(summary.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CommandLineError(f"--summary {summary}: not JSON ({exc})") from None
    elif simulate and (force or not failed(run_checks(scen))):
        typer.echo(f"simulating {scenario} with seed {seed} for the README's numbers ...")
        numbers = simulated_numbers(scen, seed)
    try:
        result = export_scenario(scen, out, target, numbers=numbers, force=force)
    except ChecksFailedError as exc:  # exit 1, as capsim check: CI tells a failed check from a bad input
        typer.echo(format_findings(exc.findings), err=True)
        typer.echo("capsim check failed: nothing written (--force writes anyway)", err=True)
        raise typer.Exit(1) from None
    if result.findings:
        typer.echo(format_findings(result.findings))
    if numbers is not None and numbers.get("summary", {}).get("slo_met") is False:
        from capsim.export.readme import SLO_MISSED

        typer.echo(f"warning: {SLO_MISSED}", err=True)
    typer.echo("wrote " + ", ".join(str(p) for p in result.files))


if __name__ == "__main__":  # pragma: no cover
    app()
