"""Benchmark class lists, read exactly as stored: one name per line, nothing stripped.

Official names carry commas (``road, route``) and even trailing spaces (ADE-150's
``"window "``); the text encoder sees them as they are, so a changed character changes
the scores. See ``ovss_cli/data/classes/SOURCES.md`` for where each list comes from.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import DatasetError
from ..io.text_files import read_user_text


def parse_class_names(text: str) -> list[str]:
    """Lines of ``text`` as names: split on ``\\n`` only, one final newline dropped.

    A ``\\r`` before the newline (a file saved with Windows line endings) is removed; every
    other character, spaces included, is kept.
    """
    if text.endswith("\n"):
        text = text[:-1]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file, one per line, kept exactly (see :func:`parse_class_names`)."""
    p = Path(path)
    text = read_user_text(p, "class list", DatasetError)
    names = parse_class_names(text)
    if not text or any(name == "" for name in names):
        raise DatasetError(f"class list {p} is empty or has an empty line; write one class per line")
    return names


def benchmark_class_names(classes_file: str) -> list[str]:
    """A packaged list from ``ovss_cli/data/classes/`` (e.g. ``"ade150.txt"``)."""
    resource = resources.files("ovss_cli") / "data" / "classes" / classes_file
    return parse_class_names(resource.read_text(encoding="utf-8"))
