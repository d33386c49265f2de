"""Command-line entry point: parses options, calls one function per command, maps errors to exit codes.

Heavy modules (torch, openslide, dask) are imported inside each command so ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from pathlib import Path

import click

from . import __version__
from .config import THRESHOLD_RULES, InferOptions
from .errors import UserError
from .infer.outputs import COHORT_DEFAULT
from .infer.outputs import OPTIONS as OUTPUT_OPTIONS

DEVICE = click.Choice(["auto", "cpu", "cuda"])


def _run(fn, *args, **kwargs):
    """Call a command body; user errors become one line on stderr and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


class _OneLineErrors(click.Group):
    """Usage errors (a missing option, a bad value) end like every other error: one line, exit 2.

    Click would print three lines (usage, a hint, "Error: ..."); the hint moves into the line. A bare
    ``wsi-haloae`` still shows the help.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "wsi-haloae"
            click.echo(f"error: {' '.join(exc.format_message().split())} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-haloae")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Unsupervised anomaly detection on whole-slide images with HaloAE."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.option("--preset", default="paper", show_default=True, help="Model preset name (models/*.json) or a JSON file.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="Describe a trained model file instead.")
def info(preset: str, model_path: Path | None) -> None:
    """Print a model's shape, trainable parameter count and cost per tile."""
    from .model.info import run_info

    _run(run_info, preset=preset, model_path=model_path)


@main.command()
@click.option("--tiles", required=True, type=click.Path(path_type=Path), help="Folder of normal tiles, or an MVTec-AD category folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model file (.safetensors).")
@click.option("--preset", default="paper", show_default=True)
@click.option("--epochs", default=250, show_default=True, type=click.IntRange(min=1))
@click.option("--samples-per-epoch", default=3000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Originals per step (each step sees 3x this many images).")
@click.option("--backbone-weights", default="imagenet", show_default=True, help="imagenet | random | PATH to a VGG19 state dict.")
@click.option("--device", default="auto", type=DEVICE, show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its resume file.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of the normal tiles (whole slides when tiles.csv names >= 3) kept out to calibrate the model; 0: none.")
@click.option("--checkpoint-minutes", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Write the resume file this often (and at every epoch end); 0: after every step.")
@click.option("--refresh-bn/--no-refresh-bn", "refresh_bn", default=True, show_default=True,
              help="Recompute BatchNorm statistics on the training tiles after the last step (else keep the training "
                   "running averages; docs/training.md gives the measured effect of each).")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the model (for long GPU runs: a few minutes to compile, then faster steps).")
@click.option("--stain-normalize", default="auto", show_default=True, type=click.Choice(["auto", "none", "macenko", "reinhard"]),
              help="Stain normalisation inside the model (auto: macenko for histology tiles, none for an MVTec-AD folder).")
@click.option("--stain-augment", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="HED stain jitter strength in training (0 = off).")
def train(**kw) -> None:
    """Train HaloAE on normal tiles."""
    from .config import TrainConfig
    from .train.trainer import run_train

    _run(run_train, TrainConfig(**kw))


@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="The model file to calibrate.")
@click.option("--tiles", required=True, type=click.Path(path_type=Path), help="Folder of NORMAL tiles from your site (e.g. `wsi-haloae tiles` on normal slides).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The calibrated model file to write (equal to --model: replace it).")
@click.option("--device", default="auto", type=DEVICE, show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
def calibrate(**kw) -> None:
    """(Re)calibrate a model on normal tiles: the p-values, calls and colour scale of infer rest on it."""
    from .calibrate import run_calibrate
    from .config import CalibrateConfig

    _run(run_calibrate, CalibrateConfig(**kw))


@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="MVTec-layout category folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else.")
@click.option("--report", type=click.Path(path_type=Path), help="Write a PNG per test image and an index.html here.")
@click.option("--device", default="auto", type=DEVICE, show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
def evaluate(model: Path, data: Path, as_json: bool, report: Path | None, device: str, batch_size: int) -> None:
    """Measure a model on an MVTec-layout test set: image AUROC, pixel AUROC, AUPRO."""
    from .evaluate import run_evaluate

    _run(run_evaluate, model=model, data=data, as_json=as_json, report=report, device=device, batch_size=batch_size)


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), help="Target microns per pixel (default: the slide's level 0).")
@click.option("--magnification", help="Target as an objective power instead of --mpp: 20x = 0.5, 40x = 0.25 µm/px (10 / power).")
@click.option("--slide-mpp", type=click.FloatRange(min=0, min_open=True), help="The scan's level-0 microns per pixel, for slides that do not record it (overrides the file's value).")
@click.option("--tile-size", default=256, show_default=True, type=click.IntRange(min=16))
@click.option("--stride", type=click.IntRange(min=1), help="Grid stride in target pixels (default: tile size).")
@click.option("--min-tissue", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--annotations", type=click.Path(path_type=Path), help="QuPath GeoJSON export: keep tiles inside these polygons.")
@click.option("--class", "class_name", help="Only annotations of this QuPath class.")
@click.option("--max-tiles", type=click.IntRange(min=1), help="Keep at most N tiles (a seeded random sample).")
@click.option("--format", "format", default="png", type=click.Choice(["png", "jpg"]), show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
def tiles(**kw) -> None:
    """Extract tissue tiles from a slide to build a training set."""
    from .config import TilesConfig
    from .slide.tiles import run_tiles

    _run(run_tiles, TilesConfig(**kw))


_OPT = InferOptions()  # the defaults shown in --help are the dataclass's own


def _infer_options(readers: str):
    """Every ``InferOptions`` field a user sets, declared once for ``infer`` and ``cohort``.

    ``readers``: the flag of ``workers`` (``--workers`` for infer; ``--infer-workers`` for cohort, where
    ``--workers-per-job`` counts Dask workers). A new option is a field of ``InferOptions`` plus one line here.
    """
    opts = [
        click.option("--mpp", default=_OPT.mpp, type=click.FloatRange(min=0, min_open=True), help="Target microns per pixel (default: the model's training mpp, else level 0)."),
        click.option("--magnification", default=_OPT.magnification, help="Target as an objective power instead of --mpp: 20x = 0.5, 40x = 0.25 µm/px (10 / power)."),
        click.option("--slide-mpp", default=_OPT.slide_mpp, type=click.FloatRange(min=0, min_open=True), help="The scan's level-0 microns per pixel, for slides that do not record it (overrides the file's value)."),
        click.option("--overlap", default=_OPT.overlap, show_default=True, type=float, help="Scoring windows overlap by this fraction of a tile (0, 0.5, 0.75 or 0.875) and their maps are blended: smoother maps for about 4x / 16x the model work at 0.5 / 0.75."),
        click.option("--batch-size", default=_OPT.batch_size, show_default=True, type=click.IntRange(min=1), help="Tiles per model call (reduced to what fits in memory, with a warning)."),
        click.option(readers, "workers", default=_OPT.workers, show_default=True, type=click.IntRange(min=0), help="Tile-reading processes per slide."),
        click.option("--device", default=_OPT.device, type=DEVICE, show_default=True),
        click.option("--pixel-downsample", default=_OPT.pixel_downsample, show_default=True, type=click.IntRange(min=1), help="Slide pixels per heatmap pixel at level 0 of the map."),
        click.option("--min-tissue", default=_OPT.min_tissue, show_default=True, type=click.FloatRange(0, 1), help="Tissue fraction a tile needs to be scored (tiles at the slide's edges count their outside as glass)."),
        click.option("--ngff", default=_OPT.ngff, type=click.Choice(["0.4", "0.5"]), show_default=True, help="OME-NGFF version of the .zarr store: 0.4 on Zarr 2 (QuPath 0.6 reads it) or 0.5 on Zarr 3."),
        click.option("--threshold", default=_OPT.threshold, show_default=True, type=click.Choice(list(THRESHOLD_RULES)), help="How tiles are classified Anomalous: fdr = calibrated p-values with Benjamini-Hochberg at --fdr (needs a calibrated model; falls back to mad with a warning); mad = per-slide median + 3 MAD (docs/scores.md)."),
        click.option("--fdr", default=_OPT.fdr, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True), help="False discovery rate of the Anomalous tiles of a slide (--threshold fdr)."),
        click.option("--overwrite", is_flag=True, help="Redo outputs that are already complete."),
    ]

    def decorate(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return decorate


def _pop_options(kw: dict) -> InferOptions:
    """The ``InferOptions`` among the parsed options (removed from ``kw``)."""
    return InferOptions(**{f.name: kw.pop(f.name) for f in fields(InferOptions) if f.name in kw})


def _output_options(cohort: bool):
    """The extra outputs of the registry (``infer.outputs``): ``--tiff PATH`` for infer, ``--tiff/--no-tiff``
    for cohort (each slide's file is named by the registry)."""

    def decorate(f):
        for name, kind in reversed(OUTPUT_OPTIONS.items()):
            if cohort:
                f = click.option(f"--{name}/--no-{name}", default=name in COHORT_DEFAULT, show_default=True,
                                 help=f"Write each slide's {kind.what} (OUT/<id>{kind.cohort_suffix}).")(f)
            else:
                f = click.option(f"--{name}", type=click.Path(path_type=Path), help=kind.help)(f)
        return f

    return decorate


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--model", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .zarr store.")
@_output_options(cohort=False)
@_infer_options("--workers")
def infer(slide: Path, model: Path, out: Path, overwrite: bool, **kw) -> None:
    """Run a trained model over a whole slide and write anomaly heatmaps."""
    from .config import InferConfig
    from .infer.engine import run_infer

    options = _run(_pop_options, kw)  # a bad value is a one-line error, exit 2
    extras = {name: kw.pop(name) for name in OUTPUT_OPTIONS}
    result = _run(run_infer, InferConfig(slide=slide, model=model, out=out, outputs=extras, options=options,
                                         overwrite=overwrite))
    click.echo(result.line(), err=True)


@main.command()
@click.option("--out", default="wsi-haloae-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default="auto", type=DEVICE, show_default=True)
@click.option("--backbone-weights", type=click.Path(path_type=Path), help="A VGG19 state dict file (default: ImageNet from the TORCH_HOME cache, else random).")
def demo(out: Path, device: str, backbone_weights: Path | None) -> None:
    """Run the whole flow offline on an embedded default slide (a few minutes on 2 CPU cores)."""
    from .demo import run_demo

    _run(run_demo, out=out, device=device, backbone_weights=backbone_weights)


@main.command()
@click.argument("slides")
@click.option("--model", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--cluster", default="local", type=click.Choice(["local", "slurm", "pbs", "sge", "lsf"]), show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), help="Batch jobs to request, or local workers (default: 1 job; locally one worker per GPU, else per --infer-workers+1 cores).")
@click.option("--workers-per-job", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--gpus-per-job", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--cores", type=click.IntRange(min=1), help="Cores per job.")
@click.option("--memory", help="Memory per job, e.g. 16GB.")
@click.option("--walltime", help="Walltime per job, e.g. 02:00:00.")
@click.option("--queue", help="Partition / queue.")
@click.option("--account", help="Account / project to charge.")
@click.option("--job-extra", multiple=True, help="Extra scheduler directive, repeatable (e.g. --job-extra=--gres=gpu:1).")
@click.option("--scheduler-address", help="Join an existing Dask scheduler instead of starting a cluster.")
@click.option("--dry-run", is_flag=True, help="Print the plan (and the job script) and exit.")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(min=0), help="Retries of a slide whose worker died.")
@_output_options(cohort=True)
@_infer_options("--infer-workers")
def cohort(job_extra: tuple[str, ...], **kw) -> None:
    """Run many slides on a Dask cluster (local, SLURM, PBS, SGE, LSF); resumable."""
    from .cohort import run_cohort
    from .config import CohortConfig

    options = _run(_pop_options, kw)  # a bad value is a one-line error, exit 2
    extras = tuple(name for name in OUTPUT_OPTIONS if kw.pop(name))
    code = _run(run_cohort, CohortConfig(job_extra=tuple(job_extra), options=options, outputs=extras, **kw))
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
