"""Shared fixtures: the reference folder (official outputs) and small seeded models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import write_seeded_san

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "sample_images"


def _reference_dir() -> Path | None:
    value = os.environ.get("OVSS_REFERENCE_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return None


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache; the on-disk text-embedding cache is off
    (its own test turns it on), so counts of encoded names mean what they say."""
    os.environ["OVSS_HOME"] = str(tmp_path_factory.mktemp("ovss-home"))
    os.environ["OVSS_TEXT_CACHE"] = "0"
    yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``$OVSS_REFERENCE_DIR``; without it the test skips, unless OVSS_REQUIRE_REFERENCE=1
    (CI sets it) turns the skip into a failure."""
    ref = _reference_dir()
    if ref is None:
        reason = "OVSS_REFERENCE_DIR is not set to the reference folder (../shared/reference)"
        if os.environ.get("OVSS_REQUIRE_REFERENCE") == "1":
            pytest.fail(reason + " but OVSS_REQUIRE_REFERENCE=1")
        pytest.skip(reason)
    return ref


@pytest.fixture(scope="session")
def seeded_san(tmp_path_factory) -> Path:
    """A small seeded SAN checkpoint written by ovss (it carries its own config)."""
    return write_seeded_san(tmp_path_factory.mktemp("san") / "tiny-san.pth", seed=0)


@pytest.fixture(scope="session")
def sample_images() -> Path:
    return SAMPLE_IMAGES
