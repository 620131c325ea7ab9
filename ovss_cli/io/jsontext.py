"""JSON text for names that are not valid UTF-8.

On Linux a file name is bytes; Python decodes the invalid ones with ``surrogateescape``, which
leaves lone surrogates in the ``str``. Those cannot be encoded as UTF-8, so a manifest naming
such a file could not be written. :func:`dumps` writes them as ``\\uXXXX`` escapes: the file is
valid UTF-8 JSON, and Python reads the same ``str`` back (``os.fsencode`` then gives the
original bytes).
"""
from __future__ import annotations

import json
import re
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, **kwargs)`` with lone surrogates escaped."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
