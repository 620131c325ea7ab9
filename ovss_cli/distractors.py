"""Distractor vocabularies: names appended after the user's classes so that a small
vocabulary does not have to paint everything. SAN's own single-image predictor does this with
the COCO-Stuff class names; pixels a distractor wins are reported as "other".

A distractor must not compete with the class it names: ``couch`` with the user's ``sofa``,
``window-other`` with ``window``, ``wall-brick`` with ``wall``. :func:`same_thing_as` finds
such pairs (the distractor then joins the class as a synonym, see
:meth:`ovss_cli.vocabulary.Vocabulary.with_distractors`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

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


# Names of one thing: a COCO-Stuff name and what users call it. A distractor in a group joins a
# user's class named by another member of the group.
SYNONYM_GROUPS: tuple[frozenset[str], ...] = tuple(frozenset(g) for g in (
    {"couch", "sofa", "settee"},
    {"tv", "television", "tv monitor", "tvmonitor", "television set", "tv set"},
    {"cell phone", "mobile phone", "cellphone", "smartphone", "phone", "mobile"},
    {"motorcycle", "motorbike"},
    {"airplane", "aeroplane", "plane", "aircraft"},
    {"bicycle", "bike"},
    {"person", "people", "human", "man", "woman", "child", "pedestrian"},
    {"refrigerator", "fridge"},
    {"donut", "doughnut"},
    {"hair drier", "hair dryer", "hairdryer"},
    {"car", "automobile"},
    {"backpack", "rucksack"},
    {"remote", "remote control"},
    {"potted plant", "houseplant", "pottedplant"},
    {"dining table", "diningtable"},
    {"playingfield", "playing field", "field", "pitch"},
    {"railroad", "railway", "railway track", "train track"},
    {"pavement", "sidewalk"},
    {"leaves", "leaf", "foliage"},
    {"sea", "ocean"},
    {"stairs", "staircase", "stairway"},
    {"waterdrops", "water drops", "raindrops"},
    {"skis", "ski"},
))

# Containing a class's words does not make these the same thing (a hot dog is not a dog).
NOT_THE_SAME: frozenset[tuple[str, str]] = frozenset({
    ("hot dog", "dog"), ("teddy bear", "bear"), ("baseball bat", "bat"), ("baseball bat", "baseball"),
    ("baseball glove", "baseball"), ("fire hydrant", "fire"), ("hair drier", "hair"), ("cell phone", "cell"),
    ("parking meter", "parking"),
})
# Words that only qualify a COCO-Stuff name ("wall-other", "desk-stuff"); they never anchor a match.
_QUALIFIERS = frozenset({"other", "stuff"})


def _words(name: str) -> tuple[str, ...]:
    """Lower-case words of a name, a plural "s" folded (``windows`` -> ``window``)."""
    words = re.split(r"[^0-9a-z]+", name.lower())
    return tuple(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words if w)


def _contains(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether ``inner`` occurs in ``outer`` as consecutive words."""
    n = len(inner)
    return 0 < n <= len(outer) and any(outer[i : i + n] == inner for i in range(len(outer) - n + 1))


def same_thing_as(distractor: str, classes: Sequence[Sequence[str]]) -> int | None:
    """The index of the first class (given as its names) that ``distractor`` names too: it is a
    known synonym of one of the class's names, or contains one as whole words (``window-other``
    and ``window-blind`` name a window, ``wall-brick`` a wall), barring known compounds such as
    ``hot dog``; None when it names something else."""
    d_key, d_words = distractor.strip().lower(), _words(distractor)
    groups = [g for g in SYNONYM_GROUPS if d_key in g or " ".join(d_words) in g]
    for index, names in enumerate(classes):
        for name in names:
            key, words = name.strip().lower(), _words(name)
            if any(key in g or " ".join(words) in g for g in groups):
                return index
            if words and not set(words) <= _QUALIFIERS and (d_key, key) not in NOT_THE_SAME \
                    and _contains(d_words, words):
                return index
    return None
