"""Tests for the model zoo, the weight cache/download and safe checkpoint loading.

Downloads go to a real HTTP server on 127.0.0.1 running in a background thread;
nothing else touches the network.
"""
from __future__ import annotations

import collections
import hashlib
import re
import socket
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from ovss_cli import weights, zoo
from ovss_cli.errors import UsageError, WeightsError
from ovss_cli.weights import (
    cache_dir,
    cached_path,
    download,
    is_cached,
    load_state_file,
    resolve_weights,
    zoo_rows,
)
from ovss_cli.zoo import ZOO, HubFile, UrlFile, ZooEntry

from fake_hosts import FakeHost, isolate_caches, isolate_network, running

PAYLOAD = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ------------------------------------------------------------------ local HTTP server


@pytest.fixture()
def server(monkeypatch):
    """Another host (not the Hub) serving /ckpt/model.pth."""
    isolate_network(monkeypatch)
    with running(FakeHost(files={"/ckpt/model.pth": PAYLOAD})) as host:
        yield host


def _requests(host: FakeHost) -> list[tuple[str, str | None]]:
    return [(r.path, r.range) for r in host.log]


@pytest.fixture(autouse=True)
def ovss_home(tmp_path, monkeypatch):
    return isolate_caches(monkeypatch, tmp_path)["ovss"]


def _entry(url: str, *, size: int | None = len(PAYLOAD), sha256: str | None = PAYLOAD_SHA) -> ZooEntry:
    return ZooEntry(
        name="test-model",
        kind="sam",
        source=UrlFile(url),
        size=size,
        sha256=sha256,
        description="test checkpoint",
        arch="vit_b",
    )


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


# ------------------------------------------------------------------------ cache paths


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("OVSS_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("OVSS_HOME")
    assert cache_dir() == tmp_path / "x" / "ovss"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ovss"


def test_cached_path_is_per_entry_and_under_weights(ovss_home):
    b16, l14 = ZOO["clip-vit-b16-openai"], ZOO["clip-vit-l14-openai"]
    assert b16.filename == l14.filename  # same published name ...
    assert cached_path(b16) != cached_path(l14)  # ... kept apart in the cache
    assert cached_path(b16).parent.parent == ovss_home / "weights"


def test_is_cached_checks_size(ovss_home):
    entry = _entry("https://example.invalid/x/model.pth")
    assert not is_cached(entry)
    path = cached_path(entry)
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD[:10])
    assert not is_cached(entry)
    path.write_bytes(PAYLOAD)
    assert is_cached(entry)
    assert is_cached(replace(entry, size=None))


# --------------------------------------------------------------------------- download


def test_download_success(server, capsys):
    entry = _entry(server.base + "/ckpt/model.pth")
    path = download(entry, progress=False)
    assert path == cached_path(entry)
    assert path.read_bytes() == PAYLOAD
    assert not _part(path).exists()
    assert is_cached(entry)
    assert _requests(server) == [("/ckpt/model.pth", None)]
    assert capsys.readouterr().err == ""  # progress=False prints nothing


def test_download_with_progress_bar(server):
    entry = _entry(server.base + "/ckpt/model.pth")
    assert download(entry, progress=True).read_bytes() == PAYLOAD


def test_download_resumes_part_file(server):
    entry = _entry(server.base + "/ckpt/model.pth")
    final = cached_path(entry)
    final.parent.mkdir(parents=True)
    half = len(PAYLOAD) // 2
    _part(final).write_bytes(PAYLOAD[:half])
    path = download(entry, progress=False)
    assert _requests(server) == [("/ckpt/model.pth", f"bytes={half}-")]
    assert path.read_bytes() == PAYLOAD
    assert not _part(path).exists()


def test_download_restarts_when_server_ignores_range(server):
    server.ignore_range = True
    entry = _entry(server.base + "/ckpt/model.pth")
    final = cached_path(entry)
    final.parent.mkdir(parents=True)
    _part(final).write_bytes(PAYLOAD[:1000])
    path = download(entry, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r.range for r in server.log] == ["bytes=1000-", None]


def test_download_restarts_when_part_is_bogus(server):
    entry = _entry(server.base + "/ckpt/model.pth", size=None)  # size unknown: cannot tell up front
    final = cached_path(entry)
    final.parent.mkdir(parents=True)
    _part(final).write_bytes(b"x" * (len(PAYLOAD) + 5))  # longer than the file: server answers 416
    path = download(entry, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_download_checksum_mismatch(server):
    entry = _entry(server.base + "/ckpt/model.pth", sha256="0" * 64)
    final = cached_path(entry)
    with pytest.raises(WeightsError) as info:
        download(entry, progress=False)
    message = str(info.value)
    assert "checksum" in message and entry.url in message
    assert "\n" not in message
    assert not final.exists()
    assert not _part(final).exists()


def test_download_size_mismatch(server):
    entry = _entry(server.base + "/ckpt/model.pth", size=len(PAYLOAD) + 1, sha256=None)
    final = cached_path(entry)
    with pytest.raises(WeightsError, match="checksum"):
        download(entry, progress=False)
    assert not final.exists() and not _part(final).exists()


def test_download_404(server):
    entry = _entry(server.base + "/ckpt/missing.pth")
    with pytest.raises(WeightsError) as info:
        download(entry, progress=False)
    message = str(info.value)
    assert entry.url in message
    assert str(cached_path(entry)) in message
    assert "404" in message and "--sam-weights FILE" in message  # a sam entry: the option that replaces it
    assert "run `ovss models download test-model`" in message
    assert "\n" not in message
    assert not cached_path(entry).exists()


def test_download_server_error(server):
    server.force_status = 503
    entry = _entry(server.base + "/ckpt/model.pth")
    with pytest.raises(WeightsError, match="503"):
        download(entry, progress=False)


def test_download_connection_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = _entry(f"http://127.0.0.1:{port}/ckpt/model.pth")
    with pytest.raises(WeightsError) as info:
        download(entry, progress=False, timeout=5)
    message = str(info.value)
    assert f"put it at {cached_path(entry)}," in message
    assert entry.url in message and "\n" not in message


def test_download_to_explicit_dest(server, tmp_path):
    entry = _entry(server.base + "/ckpt/model.pth")
    dest = tmp_path / "elsewhere" / "m.pth"
    assert download(entry, dest, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD


# ---------------------------------------------------------------------------- resolve


def test_resolve_weights_missing_local_file(tmp_path):
    missing = tmp_path / "nope" / "ckpt.pth"
    with pytest.raises(WeightsError) as info:
        resolve_weights(None, missing, default="sam-vit-b")
    message = str(info.value)
    assert str(missing) in message and "--weights" in message and message.startswith("checkpoint not found")


def test_resolve_weights_directory(tmp_path):
    with pytest.raises(WeightsError, match="directory"):
        resolve_weights(None, tmp_path, default="sam-vit-b")


def test_resolve_weights_local_file_wins(tmp_path):
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert resolve_weights("sam-vit-h", str(local), default="sam-vit-b") == local


def test_resolve_weights_downloads_once(server, monkeypatch):
    entry = _entry(server.base + "/ckpt/model.pth")
    monkeypatch.setitem(ZOO, entry.name, entry)
    first = resolve_weights(None, None, default=entry.name, progress=False)
    second = resolve_weights(entry.name, None, default="sam-vit-b", progress=False)
    assert first == second == cached_path(entry)
    assert len(server.log) == 1


def test_resolve_weights_unknown_name():
    with pytest.raises(WeightsError, match="known models: .*sam-vit-b"):
        resolve_weights("sam-vit-x", None, default="sam-vit-b")


# ------------------------------------------------------------------------------- load


_executed: list[str] = []


def _record_call(tag):
    _executed.append(tag)
    return tag


class _Booby:
    """Unpickling this would call _record_call: a stand-in for os.system."""

    def __reduce__(self):
        return (_record_call, ("unpickled!",))


def test_load_good_pth(tmp_path):
    path = tmp_path / "good.pth"
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    torch.save({"model": tensors, "iteration": 7}, path)
    state = load_state_file(path)
    assert state["iteration"] == 7
    assert torch.equal(state["model"]["w"], tensors["w"])


def test_load_truncated_pth(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError) as info:
        load_state_file(truncated)
    message = str(info.value)
    assert str(truncated) in message and "truncated or corrupt" in message and "\n" not in message


@pytest.mark.parametrize("content, kind", [(b"", "is empty"), (b"this is not a checkpoint at all", "not a readable checkpoint"),
                                           (b"garbage", "not a readable checkpoint")])
def test_load_empty_or_garbage(tmp_path, content, kind):
    """Bytes that are no checkpoint are called corrupt, not "pickled Python objects": torch's
    weights-only unpickler rejects both, with different reasons."""
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=re.escape(str(path))) as info:
        load_state_file(path)
    assert kind in str(info.value) and "pickled" not in str(info.value)


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "payload": _Booby()}, path)
    with pytest.raises(WeightsError) as info:
        load_state_file(path)
    message = str(info.value)
    assert str(path) in message and "_record_call" in message and "\n" not in message
    assert _executed == []  # nothing was run


class Tally(collections.Counter):
    """An arbitrary (non-tensor) class defined in this test module."""


def test_load_refuses_arbitrary_classes(tmp_path):
    path = tmp_path / "counter.pth"
    torch.save({"t": Tally(a=1)}, path)
    with pytest.raises(WeightsError, match="refuses"):
        load_state_file(path)


def test_load_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    state = load_state_file(path)
    assert set(state) == {"a", "b"}
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(WeightsError, match="safetensors"):
        load_state_file(broken)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_torchscript_archive(tmp_path):
    module = torch.jit.script(torch.nn.Linear(3, 2))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(module, str(path))
    state = load_state_file(path)
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], module.weight)


def test_load_non_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_state_file(path)


def test_no_unsafe_torch_load_in_sources():
    for source in Path(weights.__file__).parent.rglob("*.py"):
        for line in source.read_text(encoding="utf-8").splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source}: {line.strip()}"


# -------------------------------------------------------------------------------- zoo


def test_zoo_entries_are_well_formed():
    assert set(zoo.KINDS) == {e.kind for e in ZOO.values()}
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.kind in zoo.KINDS
        assert entry.url.startswith("https://"), name
        assert urlparse(entry.url).path.rsplit("/", 1)[-1] == entry.filename, name
        if isinstance(entry.source, HubFile):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.source.repo_id), name
            assert entry.source.revision == "main" or re.fullmatch(r"[0-9a-f]{40}", entry.source.revision), name
            assert entry.sha256 is not None, name  # Hub downloads are always checked
            assert entry.url == (f"https://huggingface.co/{entry.source.repo_id}/resolve/"
                                 f"{entry.source.revision}/{entry.filename}"), name
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), name
        assert entry.size is None or entry.size > 0, name
        assert entry.arch and entry.description


def test_zoo_expected_names_and_defaults():
    expected = {
        "san-vit-b16", "san-vit-l14", "sam-vit-b", "sam-vit-l", "sam-vit-h",
        "alpha-clip-b16-grit1m", "alpha-clip-l14-grit1m", "alpha-clip-l14-336-grit1m",
        "alpha-clip-b16-grit20m", "alpha-clip-l14-grit20m", "alpha-clip-l14-336-grit20m",
        "alpha-clip-b16-grit1m-mim", "alpha-clip-l14-grit1m-mim",
        "clip-vit-b16-openai", "clip-vit-l14-openai", "clip-vit-l14-336-openai",
    }
    assert set(ZOO) == expected
    assert ZOO[zoo.DEFAULT_SAN].kind == "san"
    assert ZOO[zoo.DEFAULT_SAM].kind == "sam"
    assert ZOO[zoo.DEFAULT_ALPHA_CLIP].kind == "alpha-clip"
    alpha = {e.name for e in zoo.entries("alpha-clip")}
    assert set(zoo.ALPHA_CLIP_BASE) == alpha
    for a, c in zoo.ALPHA_CLIP_BASE.items():
        assert ZOO[c].kind == "clip" and ZOO[c].arch == ZOO[a].arch
    assert zoo.clip_for_alpha_clip(zoo.DEFAULT_ALPHA_CLIP).name == "clip-vit-b16-openai"


def test_zoo_hosts():
    """Hugging Face-hosted files (SAN, the OpenAI CLIPs) go through the Hub; SAM and
    Alpha-CLIP come from their own hosts."""
    hub_hosted = {name for name, entry in ZOO.items() if isinstance(entry.source, HubFile)}
    assert hub_hosted == {"san-vit-b16", "san-vit-l14", "clip-vit-b16-openai", "clip-vit-l14-openai",
                          "clip-vit-l14-336-openai"}
    assert all(isinstance(e.source, UrlFile) for e in ZOO.values() if e.name not in hub_hosted)
    assert ZOO["san-vit-b16"].source.repo_id == "Mendel192/san"
    clip = ZOO["clip-vit-b16-openai"].source
    assert (clip.repo_id, clip.filename) == ("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors")
    assert clip.alternates == ("open_clip_pytorch_model.bin",)


def test_select_entries():
    names = lambda chosen: [e.name for e in chosen]  # noqa: E731
    assert names(zoo.select_entries(method="san")) == ["san-vit-b16"]
    assert names(zoo.select_entries(method="sam")) == ["sam-vit-b", "alpha-clip-b16-grit1m-mim", "clip-vit-b16-openai"]
    assert names(zoo.select_entries(all_entries=True)) == list(ZOO)
    assert names(zoo.select_entries(all_entries=True, method="san")) == ["san-vit-b16", "san-vit-l14"]
    assert {e.kind for e in zoo.select_entries(all_entries=True, method="sam")} == {"sam", "alpha-clip", "clip"}
    # an Alpha-CLIP checkpoint brings the CLIP its text encoder comes from; zoo order, no repeats
    assert names(zoo.select_entries(["alpha-clip-l14-grit20m", "sam-vit-h", "alpha-clip-l14-grit1m"])) == [
        "sam-vit-h", "alpha-clip-l14-grit1m", "alpha-clip-l14-grit20m", "clip-vit-l14-openai"]
    with pytest.raises(UsageError, match="--method san does not use"):
        zoo.select_entries(["sam-vit-b"], method="san")
    with pytest.raises(UsageError, match="--all"):
        zoo.select_entries()
    with pytest.raises(UsageError, match="not both"):
        zoo.select_entries(["sam-vit-b"], all_entries=True)
    with pytest.raises(UsageError, match="unknown method"):
        zoo.select_entries(method="dino")
    with pytest.raises(WeightsError, match="did you mean"):
        zoo.select_entries(["san-vit-b61"])


def test_zoo_lookup_errors():
    with pytest.raises(WeightsError, match="did you mean sam-vit-b"):
        zoo.get_entry("sam-vit-bb")
    with pytest.raises(WeightsError, match="known kinds"):
        zoo.entries("dino")
    assert [e.name for e in zoo.entries("sam")] == ["sam-vit-b", "sam-vit-l", "sam-vit-h"]


def test_zoo_rows(ovss_home):
    rows = zoo_rows()
    assert [r["name"] for r in rows] == list(ZOO)
    row = next(r for r in rows if r["name"] == "sam-vit-b")
    assert row == {
        "name": "sam-vit-b",
        "kind": "sam",
        "size": "357.7 MiB",
        "cached": False,
        "path": None,
        "url": ZOO["sam-vit-b"].url,
    }
    assert next(r for r in rows if r["name"] == "alpha-clip-b16-grit1m")["size"] == "?"
    placed = cached_path(ZOO["alpha-clip-b16-grit1m"])  # size unknown: any file there counts
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"weights")
    row = next(r for r in zoo_rows() if r["name"] == "alpha-clip-b16-grit1m")
    assert row["cached"] is True and row["path"] == str(placed)
