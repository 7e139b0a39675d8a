"""The ``cryoden`` command.

Every command that computes runs its stages on a Dask cluster made by
:mod:`cryoden_dist.cluster` (``--scheduler``). Errors meant for the user
(:class:`~cryoden_dist.errors.CryodenError`) print as one line, exit code 2,
no traceback unless ``--debug``.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from .errors import CryodenError, ParameterError

log = logging.getLogger("cryoden_dist")


class _Group(click.Group):
    """A click group that turns CryodenError into a one-line message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CryodenError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"cryoden: error: {exc}", err=True)
            ctx.exit(2)


def _scheduler_options(func):
    """Options shared by every command that computes: where its Dask workers run."""

    @click.option(
        "--scheduler",
        default="local",
        show_default=True,
        help="'local' (a LocalCluster, one worker per core) or a Dask scheduler address tcp://HOST:PORT.",
    )
    @click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Worker processes of the local cluster (default: one per core).",
    )
    @click.option(
        "--dashboard-address",
        default="127.0.0.1:8787",
        show_default=True,
        help="Where the Dask dashboard listens (host:port); localhost keeps it private.",
    )
    @click.option(
        "--cluster",
        type=click.Choice(["local", "slurm", "pbs", "sge"]),
        default=None,
        help="Run the workers as batch jobs through dask-jobqueue (needs --jobs or --max-jobs).",
    )
    @click.option("--jobs", type=click.IntRange(min=1), default=None, help="Fixed number of batch jobs.")
    @click.option("--min-jobs", type=click.IntRange(min=0), default=None, help="Adaptive scaling: fewest batch jobs.")
    @click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Adaptive scaling: most batch jobs.")
    @click.option(
        "--cluster-profile",
        type=click.Path(path_type=Path),
        default=None,
        help="YAML batch-job profile (cores, memory, walltime, queue, ...); default the packaged one.",
    )
    @click.option("--gpu-workers", is_flag=True, help="One GPU per batch job; workers get the Dask resource GPU=1.")
    @click.option("--tls", is_flag=True, help="Encrypt scheduler-worker traffic with auto-generated TLS certificates.")
    @functools.wraps(func)
    def wrapper(
        *args,
        scheduler,
        workers,
        dashboard_address,
        cluster,
        jobs,
        min_jobs,
        max_jobs,
        cluster_profile,
        gpu_workers,
        tls,
        **kwargs,
    ):
        from .cluster import client_context

        with client_context(
            scheduler,
            n_workers=workers,
            dashboard_address=dashboard_address,
            announce=lambda m: click.echo(m, err=True),
            cluster=cluster,
            jobs=jobs,
            min_jobs=min_jobs,
            max_jobs=max_jobs,
            profile=cluster_profile,
            gpu=gpu_workers,
            security=tls,
        ) as client:
            return func(*args, client=client, **kwargs)

    return wrapper


_overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing output made by cryoden.")


def _resume_option(command: str):
    """``--resume``: continue an interrupted run of ``command`` into ``--out``, refused if there is none.

    Rerunning the same command resumes anyway; the flag turns a mistyped
    ``--out`` into an error instead of a fresh run. It is checked before any
    worker starts.
    """

    def decorate(func):
        @click.option(
            "--resume",
            is_flag=True,
            help="Continue the interrupted run in --out (refused if there is none); "
            "rerunning the same command does the same without the check.",
        )
        @functools.wraps(func)
        def wrapper(*args, resume, **kwargs):
            if resume:
                from .pipeline import check_resumable

                if kwargs.get("overwrite"):
                    raise ParameterError("--resume and --overwrite contradict each other; pass one of them")
                check_resumable(kwargs["out"], command)
            return func(*args, **kwargs)

        return wrapper

    return decorate


_existing = click.Path(path_type=Path)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="cryoden_dist")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Denoise cryo-EM particle images at scale (Zarr + Dask)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _configure_logging(debug, verbose)


def _configure_logging(debug: bool, verbose: int) -> None:
    """Our messages at INFO (DEBUG with -v); Dask's own chatter only when it matters."""
    import distributed  # noqa: F401  (configures its loggers on import; we override them below)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    third_party = logging.INFO if verbose > 1 else (logging.WARNING if debug else logging.ERROR)
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in _CHATTY]
    for name in [*_CHATTY, *names]:
        logging.getLogger(name).setLevel(third_party)


_CHATTY = ("distributed", "bokeh", "tornado", "numcodecs", "zarr", "asyncio", "fsspec")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=_existing)
@click.option("--out", required=True, type=_existing, help="Output stack (.zarr).")
@click.option("--box", type=click.IntRange(min=8), default=None, help="Fourier-crop images to this box size.")
@click.option(
    "--pixel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pixel size in Å, when the input does not give it.",
)
@click.option(
    "--data-root",
    type=_existing,
    default=None,
    help="Directory that relative image paths are resolved against (cryoSPARC project dir).",
)
@click.option("--chunk", type=click.IntRange(min=1), default=None, help="Particles per Zarr chunk.")
@_overwrite
@_resume_option("ingest")
@_scheduler_options
def ingest(inputs, out, box, pixel_size, data_root, chunk, overwrite, client):
    """Ingest RELION .star, cryoSPARC .cs or .mrc/.mrcs stacks into a Zarr stack."""
    from .io.ingest import ingest as run_ingest

    stack = run_ingest(
        list(inputs),
        out,
        box=box,
        pixel_size=pixel_size,
        data_root=data_root,
        chunk=chunk,
        overwrite=overwrite,
        client=client,
    )
    click.echo(f"wrote {stack.path}: {stack.n} particles, box {stack.box}, pixel size {stack.pixel_size} Å")


@main.command()
@click.argument("stack", type=_existing)
@click.option("--out", required=True, type=_existing, help="Output directory for .mrcs + .star.")
@click.option("--name", default="particles", show_default=True, help="Base name of the written files.")
@_overwrite
def export(stack, out, name, overwrite):
    """Export a stack to .mrcs + a RELION 3.1 .star (optics table)."""
    from .io.export import export as run_export

    star_path, mrcs_path = run_export(stack, out, name=name, overwrite=overwrite)
    click.echo(f"wrote {star_path} and {mrcs_path}")


@main.command()
@click.option("--volume", required=True, help="A 3D map (.mrc) or 'phantom' for the built-in phantom.")
@click.option("--n", "n", required=True, type=click.IntRange(min=1), help="Number of particles.")
@click.option(
    "--snr",
    required=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Signal-to-noise ratio (variance of the clean CTF-modulated image in the particle disk / noise variance).",
)
@click.option(
    "--ctf-table", type=_existing, default=None, help="Real CTF table (.npy, cryoDRGN columns) to draw CTFs from."
)
@click.option("--defocus-range", type=(float, float), default=None, help="Uniform defocus range in Å (when no table).")
@click.option("--no-ctf", is_flag=True, help="Simulate without CTF.")
@click.option(
    "--noise",
    default="white",
    show_default=True,
    help="'white' or 'micrograph:FILE.mrc' (add ':whiten' to whiten the patches).",
)
@click.option(
    "--max-shift",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Random shifts up to this many px.",
)
@click.option(
    "--pixel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pixel size in Å (default: the map's, or 5 Å for the phantom).",
)
@click.option("--box", type=click.IntRange(min=8), default=None, help="Image size (default: the map's; phantom: 65).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=None, help="Particles per Zarr chunk.")
@click.option("--out", required=True, type=_existing, help="Output stack (.zarr).")
@_overwrite
@_resume_option("simulate")
@_scheduler_options
def simulate(
    volume,
    n,
    snr,
    ctf_table,
    defocus_range,
    no_ctf,
    noise,
    max_shift,
    pixel_size,
    box,
    seed,
    chunk,
    out,
    overwrite,
    client,
):
    """Simulate noisy CTF-modulated projections of a map, with ground truth."""
    from .sim.simulate import simulate as run_simulate

    stack = run_simulate(
        volume,
        out,
        n=n,
        snr=snr,
        ctf_table=ctf_table,
        defocus_range=defocus_range,
        with_ctf=not no_ctf,
        noise=noise,
        max_shift=max_shift,
        pixel_size=pixel_size,
        box=box,
        seed=seed,
        chunk=chunk,
        overwrite=overwrite,
        client=client,
    )
    click.echo(f"wrote {stack.path}: {stack.n} particles, box {stack.box}, pixel size {stack.pixel_size} Å")


@main.command()
@click.argument("stack", type=_existing)
@click.option("--method", default="wiener", show_default=True, help="Denoising method (see `cryoden methods`).")
@click.option("--out", required=True, type=_existing, help="Output stack (.zarr).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Method parameter (repeatable).")
@click.option(
    "--center",
    "center_radius",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="R",
    help="First re-centre the particles (particle radius R px) into STACK/centering and denoise those.",
)
@click.option(
    "--center-search", type=click.IntRange(min=1), default=8, show_default=True, help="sCM search half-width in px."
)
@click.option(
    "--center-method",
    type=click.Choice(["scm", "cm", "gm"]),
    default="scm",
    show_default=True,
    help="Centering method.",
)
@_overwrite
@_resume_option("denoise")
@_scheduler_options
def denoise(stack, method, out, params, center_radius, center_search, center_method, overwrite, client):
    """Denoise a stack with METHOD into a new stack (optionally re-centring it first)."""
    from .denoise import denoise as run_denoise
    from .denoise import parse_params

    params = parse_params(params)
    source = stack
    if center_radius is not None:
        import numpy as np

        from .centering import center as run_center
        from .centering import centered_path, check_centered_output, mark_centered, stage_params

        centering = stage_params(center_method, center_radius, center_search, apply=True)
        check_centered_output(stack, out, centering, overwrite)
        centred = run_center(
            stack, radius=center_radius, search=center_search, method=center_method, apply=True, client=client
        )
        source = centered_path(stack)
        shifts = centred.group["centering/shifts_px"][:]
        click.echo(
            f"centred {centred.n} particles of {centred.path} with {center_method} (radius {center_radius:g} px"
            + (f", search +-{center_search} px" if center_method == "scm" else "")
            + f"): mean |shift| {float(np.hypot(*shifts.T).mean()):.2f} px, re-centred stack {source}"
        )
    result = run_denoise(source, out, method=method, params=params, overwrite=overwrite, client=client)
    if center_radius is not None:
        mark_centered(result.path, source)
    click.echo(
        f"wrote {result.path}: {result.n} particles denoised with {method}"
        + (f" from {source}" if source != stack else "")
    )


@main.command()
@click.argument("stack", type=_existing)
@click.option("--radius", required=True, type=float, help="Particle radius in px (rings 0..radius).")
@click.option("--search", default=8, show_default=True, type=int, help="sCM search half-width in px.")
@click.option(
    "--method", default="scm", show_default=True, help="scm (rotational-averaging landscape), cm or gm baselines."
)
@click.option(
    "--apply",
    is_flag=True,
    help="Also write the re-centred particles as a stack at STACK/centering (input images kept).",
)
@_scheduler_options
def center(stack, radius, search, method, apply, client):
    """Estimate each particle's offset from the box centre (written to centering/ in STACK)."""
    import numpy as np

    from .centering import center as run_center

    result = run_center(stack, radius=radius, search=search, method=method, apply=apply, client=client)
    shifts = result.group["centering/shifts_px"][:]
    click.echo(
        f"centred {result.n} particles of {result.path} with {method}: "
        f"mean |shift| {float(np.hypot(*shifts.T).mean()):.2f} px (centering/shifts_px)"
    )


@main.command()
def methods():
    """List the denoising methods."""
    from .denoise import METHODS

    for name, method in METHODS.items():
        click.echo(f"{name:16s} {method.summary}")


@main.command()
@click.argument("stack", type=_existing)
@click.option("--truth", required=True, type=_existing, help="Simulated stack holding truth/clean.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--png", type=_existing, default=None, help="Also write a montage PNG (noisy / denoised / clean).")
@_scheduler_options
def evaluate(stack, truth, as_json, png, client):
    """Compare a (denoised) stack with the clean images of a simulation."""
    from .evaluate import evaluate as run_evaluate

    summary = run_evaluate(stack, truth, client=client)
    if png is not None:
        from .plots import montage_from_stores

        montage_from_stores(png, truth=truth, denoised=stack)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            click.echo(f"{key:24s} {value}")


@main.command()
@click.argument("stack", type=_existing)
@click.option("--out", required=True, type=_existing, help="PNG file to write.")
@click.option("--truth", type=_existing, default=None, help="Simulated stack for the noisy/clean rows.")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=8, show_default=True)
def plot(stack, out, truth, n_images):
    """Write a montage PNG of a stack (with noisy and clean rows when --truth is given)."""
    from .plots import montage_from_stores

    montage_from_stores(out, truth=truth, denoised=stack, n_images=n_images)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("store", type=_existing)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(store, as_json):
    """Show what a run store holds: command, completeness, and each stage's chunks, wall time and memory."""
    from .status import format_status, store_status

    summary = store_status(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_status(summary))


@main.command()
@click.argument("stack", type=_existing)
@click.option("--json", "as_json", is_flag=True, help="Print the attribute record as JSON.")
def info(stack, as_json):
    """Describe a stack: size, pixel size, CTF, provenance, stages."""
    from .stack import ParticleStack

    particles = ParticleStack.open(stack)
    record = particles.info
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    click.echo(f"{particles.path}")
    click.echo(f"  kind        {record.get('kind')}")
    click.echo(f"  particles   {particles.n}   box {particles.box}   pixel size {particles.pixel_size} Å")
    click.echo(f"  chunks      {particles.n_chunks} x {particles.chunk} particles")
    click.echo(f"  CTF         {'yes' if particles.has_ctf else 'no (' + str(record.get('ctf_missing_reason')) + ')'}")
    click.echo(f"  complete    {record.get('complete')}")
    command = record.get("command") or {}
    if command:
        click.echo(f"  made by     cryoden {command.get('name')}")
    for name, stage in (record.get("stages") or {}).items():
        click.echo(f"  stage {name:12s} complete={stage.get('complete')} wall={stage.get('wall_s_last_run')} s")
    for key in ("snr", "snr_definition", "source_files"):
        if key in record:
            click.echo(f"  {key:11s} {record[key]}")


if __name__ == "__main__":  # pragma: no cover
    main()
