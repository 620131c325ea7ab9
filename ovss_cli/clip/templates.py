"""Prompt templates: each class name is written into every template of a set.

``vild`` is the 14-template set SAN is trained and evaluated with (from the ViLD paper);
``photo`` is the single template the SAM + Alpha-CLIP pipeline uses.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..io.text_files import read_user_text

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "vild": (
        "a photo of a {}.",
        "This is a photo of a {}",
        "There is a {} in the scene",
        "There is the {} in the scene",
        "a photo of a {} in the scene",
        "a photo of a small {}.",
        "a photo of a medium {}.",
        "a photo of a large {}.",
        "This is a photo of a small {}.",
        "This is a photo of a medium {}.",
        "This is a photo of a large {}.",
        "There is a small {} in the scene.",
        "There is a medium {} in the scene.",
        "There is a large {} in the scene.",
    ),
    "photo": ("a photo of a {}.",),
}


def get_templates(spec: str) -> tuple[str, ...]:
    """A named template set, or a text file with one template per line (each containing ``{}``)."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"unknown template set {spec!r}: use one of {', '.join(TEMPLATE_SETS)} or a file with one template per line"
        )
    lines = [ln.strip() for ln in read_user_text(path, "templates file").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not templates:
        raise UsageError(f"templates file {path} has no templates")
    for t in templates:
        if t.count("{}") != 1:
            raise UsageError(f"templates file {path}: template {t!r} must contain exactly one '{{}}'")
    return templates
