"""Distractor vocabularies: names appended after the user's classes so that a small
vocabulary does not have to paint everything. SAN's own single-image predictor does this with
the COCO-Stuff class names; pixels a distractor wins are reported as "other".
"""
from __future__ import annotations

from pathlib import Path

from .datasets.classes import benchmark_class_names
from .errors import UsageError
from .io.text_files import read_user_text

DISTRACTOR_SETS = ("coco-all", "coco-stuff", "none")
_COCO_THINGS = 80  # COCO-Stuff-171 lists the 80 thing classes first, then the 91 stuff classes


def distractor_names(spec: str) -> list[str]:
    """``coco-all`` (the 171 COCO-Stuff names), ``coco-stuff`` (its 91 stuff names), ``none``,
    or a file with one name per line."""
    if spec == "none":
        return []
    if spec in ("coco-all", "coco-stuff"):
        names = benchmark_class_names("cocostuff171.txt")
        return names if spec == "coco-all" else names[_COCO_THINGS:]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"unknown --distractors {spec!r}: use {', '.join(DISTRACTOR_SETS)} or a file with one name per line"
        )
    lines = read_user_text(path, "distractors file").splitlines()
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise UsageError(f"distractors file {path} has no names")
    return names
