"""What a comparison compares: ``--methods san,sam`` and ``--variant "LABEL=METHOD:option=value,..."``.

Option names are :func:`~ovss_cli.segmenter.load_segmenter`'s keywords (``weights``,
``region``, ``no_alpha``, ``containment_filter``, ``precision``, ...); values are read with the
type the method's factory declares (``true``/``false``, numbers, ``none``). Every entry is
checked before any model loads: an unknown method or option, a bad value, or two entries with
one label are errors naming the entry.
"""
from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import OvssError, UsageError
from ..segmenter import METHODS, _check_options, _factory, check_segmenter_options

# command-line options that name one method's checkpoint
_CHECKPOINT_OPTIONS = ("model", "weights", "clip_config")


@dataclass(frozen=True)
class Entry:
    """One column of the comparison: a label, a method and its options."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        """The entry's folder under ``OUT/entries`` (the label, made file-name safe)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("._") or "entry"


def parse_entries(methods: str | None, variants: Sequence[str], base: dict[str, Any]) -> list[Entry]:
    """Entries from ``--methods`` (default ``san,sam`` when no variant is given) then each
    ``--variant``; ``base`` holds the options given on the command line, which every entry
    whose method takes them starts from (a variant's own options win)."""
    specs: list[tuple[str, str, dict[str, str]]] = []  # (label, method, options as written)
    if methods is not None or not variants:
        for name in (methods or "san,sam").split(","):
            name = name.strip()
            if not name:
                raise UsageError(f"--methods {methods!r}: an entry is empty; write e.g. --methods san,sam")
            specs.append((name, name, {}))
    for spec in variants:
        label, sep, rest = spec.partition("=")
        method, _, options = rest.partition(":")
        if not sep or not label.strip() or not method.strip():
            raise UsageError(f"--variant {spec!r}: write LABEL=METHOD:option=value,option=value, "
                             "e.g. --variant \"blur=sam:region=blur\"")
        parsed = {}
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"--variant {spec!r}: {item!r} is not option=value")
            parsed[key.strip().replace("-", "_")] = value.strip()
        specs.append((label.strip(), method.strip(), parsed))
    given = [k for k in _CHECKPOINT_OPTIONS if base.get(k) is not None]
    if given and len({method for _, method, _ in specs}) > 1:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} names one method's checkpoint, but the entries use several methods; give it per "
                         f"entry instead, e.g. --variant \"mine=san:{given[0]}=FILE\"")
    entries = [_entry(label, method, options, base) for label, method, options in specs]
    labels = [e.label for e in entries]
    for label in labels:
        if labels.count(label) > 1:
            raise UsageError(f"two entries are labelled {label!r}; give each --variant its own label")
    folders = [e.folder_name for e in entries]
    if len(set(folders)) < len(folders):
        raise UsageError("entry labels must differ in more than punctuation: " + ", ".join(labels))
    return entries


def _entry(label: str, method: str, options: dict[str, str], base: dict[str, Any]) -> Entry:
    if method not in METHODS:
        raise UsageError(f"entry {label!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    factory = _factory(method)
    accepted = inspect.signature(factory).parameters
    merged = {k: v for k, v in base.items() if k in accepted and v is not None}
    try:
        _check_options(method, factory, options)
    except UsageError as err:
        raise UsageError(f"entry {label!r}: {err} (options are load_segmenter's keywords, e.g. "
                         f"{', '.join(sorted(k for k in accepted if k != 'progress'))})") from None
    hints = typing.get_type_hints(factory)
    for key, text in options.items():
        merged[key] = _value(label, key, text, hints.get(key, str))
    try:  # the values load_segmenter would refuse (region=circle, precision=xyz, a missing file)
        check_segmenter_options(method, **merged)
    except OvssError as err:
        raise type(err)(f"entry {label!r}: {err}") from None
    return Entry(label, method, merged)


def _value(label: str, key: str, text: str, kind: Any) -> Any:
    """``text`` as the factory's declared type for ``key``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    for target in args:
        if target is bool:
            if text.lower() in ("true", "yes", "1", "on"):
                return True
            if text.lower() in ("false", "no", "0", "off"):
                return False
            continue
        try:
            return target(text)
        except (TypeError, ValueError):
            continue
    raise UsageError(f"entry {label!r}: option {key}={text!r} is not a {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
