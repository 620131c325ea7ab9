"""Vocabularies: the classes a user asks for, each with one or more names.

A class scores as the best of its names (``cat: kitty, kitten`` is one class with three
names). Parsing rejects empty and duplicate entries with a message naming the culprit.
Distractor names compete with the classes, except those naming the same thing as a class:
those join it (see :mod:`ovss_cli.distractors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import torch

from .errors import UsageError


@dataclass(frozen=True)
class VocabularyClass:
    """One output class: its display name, the user's synonyms, and distractor names merged
    into it because they name the same thing (prompted like synonyms, never displayed)."""

    name: str
    synonyms: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The names the user gave."""
        return (self.name, *self.synonyms)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        """Every name the class is prompted with: the user's, then merged distractors."""
        return (*self.names, *self.merged)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes; label ``i`` in every output means ``classes[i]``."""

    classes: tuple[VocabularyClass, ...]
    # Benchmark class lists split into synonyms may repeat a name across classes.
    unique_names: bool = field(default=True, compare=False)
    # Extra names that compete with the classes; pixels they win are reported as "other".
    distractors: tuple[str, ...] = ()
    # Distractor names left out because they equal one of the classes' names.
    dropped_distractors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.classes:
            raise UsageError("the vocabulary is empty: give at least one class, e.g. --classes \"cat,sofa\"")
        if not self.unique_names:
            return
        seen: dict[str, str] = {}
        for cls in self.classes:
            for name in cls.names:
                if not name.strip():
                    raise UsageError(f"class {cls.name!r} has an empty name")
                key = name_key(name)
                if key in seen:
                    raise UsageError(
                        f"duplicate class name {name.strip()!r} (also in class {seen[key]!r}); "
                        "each name may appear once"
                    )
                seen[key] = cls.name

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Display names, one per class."""
        return [c.name for c in self.classes]

    @property
    def prompt_names(self) -> list[str]:
        """Every name of every class in class order, then the distractors (what the text
        encoder sees)."""
        return [n for c in self.classes for n in c.prompt_names] + list(self.distractors)

    @property
    def name_to_class(self) -> list[int]:
        """For each entry of :attr:`prompt_names`, the index of the class it belongs to;
        distractor ``j`` counts as its own class ``len(self) + j``."""
        own = [i for i, c in enumerate(self.classes) for _ in c.prompt_names]
        return own + [len(self.classes) + j for j in range(len(self.distractors))]

    def to_dict(self) -> dict[str, Any]:
        """Everything that decides what the vocabulary prompts and outputs (JSON-able)."""
        return {"classes": [list(c.names) for c in self.classes], "merged": self.merged_distractors,
                "distractors": list(self.distractors)}

    @property
    def merged_distractors(self) -> dict[str, list[str]]:
        """Class name -> the distractor names merged into it (classes with none left out)."""
        return {c.name: list(c.merged) for c in self.classes if c.merged}

    @property
    def num_competitors(self) -> int:
        """Classes plus distractors: everything a pixel or mask can be assigned to."""
        return len(self.classes) + len(self.distractors)

    def best_name_per_class(self, values: "torch.Tensor", dim: int) -> "torch.Tensor":
        """Reduce per-name ``values`` (``len(prompt_names)`` entries along ``dim``) to one entry
        per competitor (class, then each distractor): a class takes its best name's value.

        A competitor's names are contiguous in :attr:`prompt_names`, so this is one gather of
        every competitor's first name plus a max over each multi-name class's run."""
        if len(self.prompt_names) == self.num_competitors:
            return values
        import torch

        owners = self.name_to_class
        starts = [i for i, c in enumerate(owners) if i == 0 or owners[i - 1] != c]
        out = values.index_select(dim, torch.tensor(starts, device=values.device))
        for competitor, start in enumerate(starts):
            stop = starts[competitor + 1] if competitor + 1 < len(starts) else len(owners)
            if stop - start > 1:
                out.select(dim, competitor).copy_(values.narrow(dim, start, stop - start).amax(dim))
        return out

    def with_distractors(self, names: Iterable[str]) -> "Vocabulary":
        """This vocabulary's classes with ``names`` as its distractors (replacing any it had).

        A name equal (ignoring case and surrounding spaces) to one of the classes' names is
        dropped; one that names the same thing as a class (contains its name as words, or is a
        known synonym: :func:`ovss_cli.distractors.same_thing_as`) joins that class, so its wins
        count for the class; repeats are skipped; the rest compete, and what they win is "other".
        A class name holding commas (``"sofa, couch"``: one prompt, as benchmark lists and
        class files write them) is matched by each of its comma-separated parts too.
        """
        from .distractors import same_thing_as

        class_names = [tuple(dict.fromkeys(part for n in c.names for part in _name_parts(n))) for c in self.classes]
        own = {name_key(n) for names_ in class_names for n in names_}
        seen: set[str] = set()
        merged: dict[int, list[str]] = {}
        kept: list[str] = []
        dropped: list[str] = []
        for name in names:
            key = name_key(name)
            if not key or key in seen:
                continue
            seen.add(key)
            owner = None if key in own else same_thing_as(name, class_names)
            if key in own:
                dropped.append(name)
            elif owner is None:
                kept.append(name)
            else:
                merged.setdefault(owner, []).append(name)
        classes = tuple(replace(c, merged=tuple(merged.get(i, ()))) for i, c in enumerate(self.classes))
        return Vocabulary(classes, self.unique_names, tuple(kept), tuple(dropped))

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "Vocabulary":
        """One class per name, names used exactly as given (benchmark class lists)."""
        return cls(tuple(VocabularyClass(n) for n in names))

    @classmethod
    def for_benchmark(cls, names: Iterable[str], synonyms: str = "whole") -> "Vocabulary":
        """A benchmark's classes. ``whole``: each name is one prompt, commas and spaces kept
        (``"road, route"``), as the official SAN evaluation does; ``split``: comma-separated
        names are synonyms and a class scores as its best name."""
        if synonyms == "whole":
            return cls(tuple(VocabularyClass(n) for n in names), unique_names=False)
        if synonyms == "split":
            classes = []
            for n in names:
                parts = [p.strip() for p in n.split(",") if p.strip()] or [n]
                classes.append(VocabularyClass(parts[0], tuple(parts[1:])))
            return cls(tuple(classes), unique_names=False)
        raise UsageError(f"unknown --synonyms {synonyms!r}; use whole or split")


def parse_class_list(text: str) -> Vocabulary:
    """Parse ``"cat,sofa,window"``: comma-separated class names, surrounding spaces dropped."""
    parts = text.split(",")
    for i, part in enumerate(parts):
        if not part.strip():
            raise UsageError(
                f"--classes {text!r}: entry {i + 1} is empty; separate class names with single commas"
            )
    return Vocabulary(tuple(VocabularyClass(p.strip()) for p in parts))


def parse_class_lines(lines: Sequence[str], source: str = "<classes>") -> Vocabulary:
    """Parse one class per line; ``name: synonym, synonym`` gives a class several names.

    Blank lines and lines starting with ``#`` are skipped.
    """
    classes = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not name:
            raise UsageError(f"{source}:{lineno}: class name is empty in {raw.rstrip()!r}")
        synonyms: tuple[str, ...] = ()
        if sep:
            synonyms = tuple(s.strip() for s in rest.split(","))
            if any(not s for s in synonyms):
                raise UsageError(
                    f"{source}:{lineno}: empty synonym in {raw.rstrip()!r}; write 'name: synonym, synonym'"
                )
        classes.append(VocabularyClass(name, synonyms))
    if not classes:
        raise UsageError(f"{source}: no classes found; write one class per line")
    try:
        return Vocabulary(tuple(classes))
    except UsageError as err:
        raise UsageError(f"{source}: {err}") from None


def read_class_file(path: str | Path) -> Vocabulary:
    """Read a class file (see :func:`parse_class_lines`)."""
    from .io.text_files import read_user_text

    return parse_class_lines(read_user_text(path, "classes file").splitlines(), source=str(path))


def load_vocabulary(classes: str | None, classes_file: str | Path | None) -> Vocabulary:
    """The vocabulary from ``--classes`` or ``--classes-file`` (exactly one of them)."""
    if classes is not None and classes_file is not None:
        raise UsageError("give either --classes or --classes-file, not both")
    if classes_file is not None:
        return read_class_file(classes_file)
    if classes is None:
        raise UsageError('no vocabulary: pass --classes "cat,sofa,window" or --classes-file FILE')
    return parse_class_list(classes)


def as_vocabulary(vocabulary: "Vocabulary | Sequence[str] | str") -> Vocabulary:
    """Accept a :class:`Vocabulary`, a list of names, or a comma-separated string."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if isinstance(vocabulary, str):
        return parse_class_list(vocabulary)
    return Vocabulary(tuple(VocabularyClass(str(n).strip()) for n in vocabulary))


def name_key(name: str) -> str:
    """What makes two names the same to CLIP: Unicode-normalised (NFKC: "café" typed either way),
    case-folded, runs of whitespace as one space, ends stripped."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def _name_parts(name: str) -> list[str]:
    """A class name and, when it holds commas, each comma-separated part (``"sofa, couch"`` ->
    ``["sofa, couch", "sofa", "couch"]``): what a distractor may name."""
    return [name] + [part.strip() for part in name.split(",") if part.strip()] if "," in name else [name]
