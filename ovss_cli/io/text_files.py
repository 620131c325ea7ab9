"""Reading text files the user names (class lists, templates, configs): one clear error."""
from __future__ import annotations

from pathlib import Path

from ..errors import OvssError, UsageError


def read_user_text(path: str | Path, what: str, error: type[OvssError] = UsageError, hint: str = "") -> str:
    """UTF-8 text of ``path``; missing or unreadable -> ``error`` naming ``what`` and the path."""
    p = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {p}{suffix}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {what} {p}: {err}") from None
