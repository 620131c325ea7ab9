"""Hugging Face-hosted checkpoints: fetched through huggingface_hub, shared with its cache,
checked against the zoo's sha256, and never requested in offline mode.

A local server (tests/fake_hosts.py) stands in for the Hub (``HF_ENDPOINT`` points at it)
and a second one for another host; their request logs show what went over the wire.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pytest

from ovss_cli import weights
from ovss_cli.errors import WeightsError
from ovss_cli.weights import cached_path, fetch, find_cached, prefetch, resolve_weights
from ovss_cli.zoo import ZOO, HubFile, UrlFile, ZooEntry

from fake_hosts import FakeHost, forbid_connections, isolate_caches, isolate_network, running

PAYLOAD = bytes((i * 13 + i // 97) % 256 for i in range(200_000))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
OLD, NEW = "1" * 40, "2" * 40  # two commits of the fake repository
REPO = "org/ckpt"


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    return isolate_caches(monkeypatch, tmp_path)


@pytest.fixture()
def hub_host(monkeypatch):
    """The fake Hub: org/ckpt has model.pth at commit OLD and NEW (main)."""
    isolate_network(monkeypatch)
    host = FakeHost()
    host.add_hub_file(REPO, "model.pth", PAYLOAD, commit=OLD, main=False)
    host.add_hub_file(REPO, "model.pth", PAYLOAD, commit=NEW)
    with running(host):
        monkeypatch.setenv("HF_ENDPOINT", host.base)
        yield host


@pytest.fixture()
def other_host(monkeypatch):
    isolate_network(monkeypatch)
    with running(FakeHost(files={"/dl/plain.pth": PAYLOAD})) as host:
        yield host


def hub_entry(name="hub-model", *, revision="main", sha256=PAYLOAD_SHA, size=len(PAYLOAD), filename="model.pth",
              alternates=()) -> ZooEntry:
    return ZooEntry(name=name, kind="san", source=HubFile(REPO, filename, revision, alternates), size=size,
                    sha256=sha256, description="test", arch="san-vit-b16")


def url_entry(host: FakeHost, name="plain-model") -> ZooEntry:
    return ZooEntry(name=name, kind="sam", source=UrlFile(host.base + "/dl/plain.pth"), size=len(PAYLOAD),
                    sha256=PAYLOAD_SHA, description="test", arch="vit_b")


def snapshot(caches, commit: str, filename: str = "model.pth", repo: str = REPO) -> Path:
    return caches["hf_cache"] / f"models--{repo.replace('/', '--')}" / "snapshots" / commit / filename


# ----------------------------------------------------------------------------- download


def test_hub_file_is_fetched_through_huggingface_hub(hub_host, caches, monkeypatch):
    entry = hub_entry()
    monkeypatch.setitem(ZOO, entry.name, entry)
    path = resolve_weights(entry.name, None, default="san-vit-b16", progress=False)
    # huggingface_hub's cache layout: snapshot symlink -> blob named by the sha256 (ETag)
    assert path == snapshot(caches, NEW)
    assert path.read_bytes() == PAYLOAD
    assert path.resolve() == caches["hf_cache"] / "models--org--ckpt" / "blobs" / PAYLOAD_SHA
    assert not cached_path(entry).exists()  # nothing duplicated into ovss's own cache
    # (huggingface_hub may also ask the endpoint for its own registries: only the repository's paths count)
    assert [(r.method, r.path) for r in hub_host.requests_to("/org/")] == [
        ("HEAD", f"/{REPO}/resolve/main/model.pth"), ("GET", f"/{REPO}/resolve/main/model.pth")]
    # the second run finds it in the cache: no request at all
    before = len(hub_host.log)
    assert resolve_weights(entry.name, None, default="san-vit-b16", progress=False) == path
    assert len(hub_host.log) == before


def test_pinned_revision_is_requested(hub_host, caches):
    path = fetch(hub_entry(revision=OLD), progress=False)
    assert path == snapshot(caches, OLD)
    assert {r.path for r in hub_host.requests_to("/org/")} == {f"/{REPO}/resolve/{OLD}/model.pth"}


def test_hf_token_is_sent(hub_host, monkeypatch):
    hub_host.require_token = "hf_secret"
    with pytest.raises(WeightsError) as info:
        fetch(hub_entry(), progress=False)
    message = str(info.value)
    assert "HTTP 401" in message and "HF_TOKEN" in message and "\n" not in message
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch(hub_entry(), progress=False).read_bytes() == PAYLOAD
    assert hub_host.log[-1].authorization == "Bearer hf_secret"


def test_missing_hub_file_names_the_fix(hub_host, caches):
    entry = hub_entry(filename="nope.pth")
    with pytest.raises(WeightsError) as info:
        fetch(entry, progress=False)
    message = str(info.value)
    assert message.startswith("cannot download hub-model (HTTP 404")
    assert f"{hub_host.base}/{REPO}/resolve/main/nope.pth" in message  # the mirror's URL, from HF_ENDPOINT
    assert "run `ovss models download hub-model`" in message and f"put it at {cached_path(entry)}," in message
    assert "\n" not in message


def test_lying_mirror_checksum_mismatch_removes_the_download(hub_host, caches):
    """A mirror that claims the right ETag but serves other bytes: huggingface_hub stores the
    blob under the claimed name, our sha256 check catches it and deletes blob and snapshot."""
    bad = bytes(reversed(PAYLOAD))
    hub_host.add_hub_file(REPO, "model.pth", bad, commit=NEW)
    hub_host.etag_override[f"/{REPO}/resolve/main/model.pth"] = PAYLOAD_SHA
    entry = hub_entry()
    with pytest.raises(WeightsError) as info:
        fetch(entry, progress=False)
    message = str(info.value)
    assert "checksum did not match for hub-model" in message and "the download was deleted" in message
    assert not snapshot(caches, NEW).exists() and not snapshot(caches, NEW).is_symlink()
    assert not (caches["hf_cache"] / "models--org--ckpt" / "blobs" / PAYLOAD_SHA).exists()
    assert find_cached(entry) is None  # the bad copy is not picked up later


def test_size_mismatch_removes_the_download(hub_host, caches):
    entry = hub_entry(size=len(PAYLOAD) + 1, sha256=PAYLOAD_SHA)
    with pytest.raises(WeightsError, match="got 200000 bytes, expected 200001"):
        fetch(entry, progress=False)
    assert not snapshot(caches, NEW).exists()


def test_dropped_connection_resumes_with_a_range_request(hub_host, caches):
    """A transfer cut short is resumed with a Range request (the fake Hub answers 206), not
    restarted. huggingface_hub >= 2 resumes within the call (it writes in 10 MiB chunks);
    older releases keep the partial blob and resume on the next run."""
    big = random.Random(0).randbytes(11 << 20)
    hub_host.add_hub_file(REPO, "big.pth", big, commit=NEW)
    cut = 21 << 19  # 10.5 MiB, then the connection closes
    hub_host.cut_first_get[f"/{REPO}/resolve/main/big.pth"] = cut
    entry = hub_entry(filename="big.pth", size=len(big), sha256=hashlib.sha256(big).hexdigest())
    try:
        path = fetch(entry, progress=False)
    except WeightsError as error:
        assert "run again to resume" in str(error)
        path = fetch(entry, progress=False)
    assert path.read_bytes() == big
    ranges = [r.range for r in hub_host.requests_to("/org/") if r.method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < start <= cut


# -------------------------------------------------------------------- the Hugging Face cache


def test_copy_cached_by_open_clip_is_used_without_any_request(hub_host, caches):
    """open_clip fetches ``main`` with huggingface_hub into the shared cache; an entry pinned to
    another commit finds that copy by its blob (named by the sha256) and asks nothing."""
    from huggingface_hub import hf_hub_download

    hf_hub_download(REPO, "model.pth", cache_dir=str(caches["hf_cache"]), endpoint=hub_host.base)
    hub_host.log.clear()
    entry = hub_entry(revision=OLD)
    assert fetch(entry, progress=False) == snapshot(caches, NEW)
    assert hub_host.log == []
    # a blob under another sha256 is another file: not taken for ours
    assert find_cached(hub_entry(revision=OLD, sha256="f" * 64)) is None


def _fake_hub_cache(caches, repo: str, commit: str, filename: str, blob_name: str, size: int) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out (a sparse blob of ``size`` bytes)."""
    repo_dir = caches["hf_cache"] / f"models--{repo.replace('/', '--')}"
    blob = repo_dir / "blobs" / blob_name
    blob.parent.mkdir(parents=True, exist_ok=True)
    with blob.open("wb") as handle:
        handle.truncate(size)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return link


def test_real_clip_entry_found_in_hugging_face_cache(hub_host, caches):
    """The zoo's OpenAI CLIP, cached by open_clip at whatever commit main was, is found with
    no request; the same file under another blob name (other content) is not."""
    entry = ZOO["clip-vit-b16-openai"]
    repo = entry.source.repo_id
    other = _fake_hub_cache(caches, repo, "a" * 40, entry.filename, "0" * 64, entry.size)
    assert find_cached(entry) is None
    other.unlink()
    link = _fake_hub_cache(caches, repo, "b" * 40, entry.filename, entry.sha256, entry.size)
    assert resolve_weights("clip-vit-b16-openai", None, default="", progress=False) == link
    assert hub_host.log == []


def test_open_clip_bin_alternate_is_used_from_the_cache(hub_host, caches):
    """Older open_clip releases fetched open_clip_pytorch_model.bin (the same weights): used as is."""
    entry = ZOO["clip-vit-l14-openai"]
    link = _fake_hub_cache(caches, entry.source.repo_id, "c" * 40, "open_clip_pytorch_model.bin", "d" * 64, 1234)
    assert find_cached(entry) == link
    assert fetch(entry, progress=False) == link
    assert hub_host.log == []


def test_ovss_cache_is_looked_at_first(hub_host, caches):
    """A file fetched by hand and put where the error message says is used for a Hub entry."""
    entry = hub_entry()
    placed = cached_path(entry)
    placed.parent.mkdir(parents=True)
    placed.write_bytes(PAYLOAD)
    assert fetch(entry, progress=False) == placed
    assert hub_host.log == []


# ------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("variable", ["OVSS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_makes_no_request(hub_host, other_host, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    attempts = forbid_connections(monkeypatch)
    for entry in (hub_entry(), url_entry(other_host)):
        with pytest.raises(WeightsError) as info:
            fetch(entry, progress=False)
        message = str(info.value)
        assert message.startswith(f"{entry.name} is not in the cache and downloads are off ({variable}=1)")
        assert f"run `ovss models download {entry.name}`" in message
        assert f"put it at {cached_path(entry)}," in message and "\n" not in message
    with pytest.raises(WeightsError, match="downloads are off"):
        weights.download(url_entry(other_host), progress=False)  # the low-level downloader too
    assert hub_host.log == [] and other_host.log == [] and attempts == []


def test_offline_uses_what_is_cached(hub_host, caches, monkeypatch):
    entry = hub_entry()
    path = fetch(entry, progress=False)
    hub_host.log.clear()
    monkeypatch.setenv("OVSS_OFFLINE", "1")
    assert fetch(entry, progress=False) == path
    assert prefetch(entry, progress=False).path == path  # verifying reads the file, not the network
    assert hub_host.log == []


@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_offline_values(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert (weights.offline_mode() is not None) is offline


# ----------------------------------------------------------------------------- prefetch


def test_prefetch_verifies_and_replaces_a_corrupt_copy(other_host, caches):
    entry = url_entry(other_host)
    first = prefetch(entry, progress=False)
    assert (first.action, first.verified) == ("downloaded", True)
    assert prefetch(entry, progress=False).action == "cached"
    assert prefetch(entry, progress=False, verify=False).verified is False
    first.path.write_bytes(bytes(len(PAYLOAD)))  # right size, wrong bytes: only the hash can tell
    again = prefetch(entry, progress=False)
    assert (again.action, again.verified) == ("replaced", True)
    assert again.path.read_bytes() == PAYLOAD
    assert [r.path for r in other_host.log] == ["/dl/plain.pth", "/dl/plain.pth"]
