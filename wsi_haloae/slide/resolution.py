"""One set of rules for the resolution a slide is read at, shared by ``tiles``, ``infer`` and ``cohort``.

Two numbers matter: the slide's level-0 microns per pixel (what the scan *is*) and the target microns per
pixel (what the model sees). The first comes from the file, or from the user (``--slide-mpp``) when the file
does not record it; it is never guessed, because a wrong guess silently scores the slide at the wrong
magnification and writes a map with the wrong physical size. The second comes from ``--mpp``,
``--magnification``, the model's training mpp, or (``tiles`` only, no model) the slide's level 0.

Pure functions of numbers (no reader, no I/O), so every rule is tested on its own and every command applies
the same ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import BadInputError, BadSlideError

#: Microns per pixel at 1x under the usual convention: 10x = 1.0, 20x = 0.5, 40x = 0.25 µm/px. Scanners
#: differ by a few per cent (CMU-1, a 20x Aperio scan, records 0.499); reads snap to a level within 2 %.
MPP_AT_1X = 10.0
#: Relative difference between the target and the model's training mpp above which we warn.
MODEL_MPP_TOLERANCE = 0.10
#: A target finer than level 0 divided by this is refused: up-sampling invents no detail, and the tile count
#: grows with the square of the factor (``--mpp 0.001`` on a 0.5 µm/px slide plans 11 million tiles).
MAX_UPSAMPLING = 4.0
#: A slide's declared (``--slide-mpp``) level 0 that differs from the file's by more than this is worth a warning.
SLIDE_MPP_TOLERANCE = 0.02

_MAG = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*[xX]?\s*$")


def magnification_to_mpp(magnification: str | float) -> float:
    """``"20x"`` → 0.5, ``"40x"`` → 0.25, ``"2.5x"`` → 4.0: ``MPP_AT_1X / magnification``.

    Accepts ``20x``, ``20X``, ``20`` or a number; anything else is a one-line ``BadInputError``.
    """
    if isinstance(magnification, str):
        m = _MAG.match(magnification)
        value = float(m.group(1)) if m else float("nan")
    else:
        value = float(magnification)
    if not (math.isfinite(value) and value > 0):
        raise BadInputError(f"--magnification must be a positive objective power such as 20x or 40x, got {magnification!r}")
    return MPP_AT_1X / value


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise BadInputError(f"{name} must be a positive number of microns per pixel, got {value}")


@dataclass(frozen=True)
class Resolution:
    """The resolved resolution of one slide.

    ``target_mpp``: what the tiles are read at. ``slide_mpp``: level-0 µm/px used to get there (the file's,
    or the declared ``--slide-mpp``). ``source``: where the target came from (``--mpp``, ``--magnification``,
    ``model``, ``slide``). ``warnings``: lines for the caller to log (this module never logs).
    """

    target_mpp: float
    slide_mpp: float
    source: str
    slide_mpp_declared: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def downsample(self) -> float:
        """Level-0 px per target px before snapping to a pyramid level (``SlideReader.scale_for`` snaps)."""
        return self.target_mpp / self.slide_mpp


def resolve_resolution(
    slide: str,
    recorded_slide_mpp: float | None,
    *,
    slide_mpp: float | None = None,
    mpp: float | None = None,
    magnification: str | float | None = None,
    model_mpp: float | None = None,
) -> Resolution:
    """The target resolution for ``slide`` (named in messages) under the project's rules.

    - Level 0: ``slide_mpp`` (``--slide-mpp``) when given (a warning if the file records another value),
      else the file's ``recorded_slide_mpp``; a slide with neither is refused with a message naming
      ``--slide-mpp``.
    - Target: ``mpp``, else ``magnification`` (``MPP_AT_1X / power``; both at once is refused), else
      ``model_mpp``, else level 0.
    - A target more than ``MAX_UPSAMPLING`` times finer than level 0 is refused.
    - A target more than 10 % away from ``model_mpp`` gives a warning (the model never saw that scale).
    """
    _check_positive("--slide-mpp", slide_mpp)
    _check_positive("--mpp", mpp)
    if mpp is not None and magnification is not None:
        raise BadInputError("give the target resolution as --mpp or as --magnification, not both")
    if model_mpp is not None and not (math.isfinite(model_mpp) and model_mpp > 0):
        model_mpp = None  # the model file's own validation reports a bad value; here it just is unknown
    warnings: list[str] = []
    recorded = recorded_slide_mpp if recorded_slide_mpp and math.isfinite(recorded_slide_mpp) and recorded_slide_mpp > 0 else None
    if slide_mpp is not None:
        level0 = float(slide_mpp)
        if recorded is not None and abs(level0 / recorded - 1) > SLIDE_MPP_TOLERANCE:
            warnings.append(f"{slide}: --slide-mpp {level0:g} overrides the {recorded:g} µm/px the file records")
    elif recorded is not None:
        level0 = float(recorded)
    else:
        raise BadSlideError(
            f"slide {slide} does not record its resolution (no openslide.mpp-x/-y); declare the scan's level-0 "
            f"microns per pixel with --slide-mpp (e.g. --slide-mpp 0.25 for a 40x scan, 0.5 for 20x)"
        )

    if mpp is not None:
        target, source = float(mpp), "--mpp"
    elif magnification is not None:
        target, source = magnification_to_mpp(magnification), "--magnification"
    elif model_mpp is not None:
        target, source = float(model_mpp), "model"
    else:
        target, source = level0, "slide"

    if target * MAX_UPSAMPLING < level0 * (1 - 1e-9):
        what = f"--magnification {magnification}" if source == "--magnification" else f"{source} {target:g} µm/px"
        raise BadInputError(
            f"{slide}: target resolution {what} is more than {MAX_UPSAMPLING:g}x finer than the slide's level 0 "
            f"({level0:g} µm/px): up-sampling adds no detail and multiplies the tiles; use at least "
            f"{level0 / MAX_UPSAMPLING:g} µm/px"
        )
    if model_mpp is not None and abs(target / model_mpp - 1) > MODEL_MPP_TOLERANCE:
        warnings.append(
            f"{slide}: scoring at {target:g} µm/px but the model was trained at {model_mpp:g} µm/px: its scores "
            f"are calibrated for the training scale only"
        )
    return Resolution(target_mpp=target, slide_mpp=level0, source=source, slide_mpp_declared=slide_mpp is not None,
                      warnings=tuple(warnings))
