"""`ovss models` (listing, --json), `ovss models download`, offline runs, `ovss --version` and
shell completion, through the CLI. Downloads go to local fake hosts (tests/fake_hosts.py)."""
from __future__ import annotations

import hashlib
import json
import platform
import re
from importlib import metadata

import pytest
from typer.testing import CliRunner

from ovss_cli.cli import app
from ovss_cli.weights import cached_path
from ovss_cli.zoo import ZOO, HubFile, UrlFile, ZooEntry

from fake_hosts import FakeHost, forbid_connections, isolate_caches, isolate_network, running

PAYLOAD = bytes((i * 31 + i // 7) % 256 for i in range(150_000))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
COMMIT = "9" * 40


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env, prog_name="ovss")


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    return isolate_caches(monkeypatch, tmp_path)


@pytest.fixture()
def hosts(monkeypatch):
    """A fake Hub (HF_ENDPOINT) with org/net/model.pth and another host with /dl/sam.pth; two zoo
    entries (one on each) are added to the zoo for the test."""
    isolate_network(monkeypatch)
    hub, other = FakeHost(), FakeHost(files={"/dl/sam.pth": PAYLOAD})
    hub.add_hub_file("org/net", "model.pth", PAYLOAD, commit=COMMIT)
    with running(hub), running(other):
        monkeypatch.setenv("HF_ENDPOINT", hub.base)
        for entry in (
            ZooEntry("test-san", "san", HubFile("org/net", "model.pth"), len(PAYLOAD), PAYLOAD_SHA, "t", "san-vit-b16"),
            ZooEntry("test-sam", "sam", UrlFile(other.base + "/dl/sam.pth"), len(PAYLOAD), PAYLOAD_SHA, "t", "vit_b"),
        ):
            monkeypatch.setitem(ZOO, entry.name, entry)
        yield hub, other


def _lines(output: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in output.splitlines() if ": " in line}


def test_models_download_end_to_end(hosts, caches):
    hub, other = hosts
    result = invoke("models", "download", "test-san", "test-sam", "--quiet")
    assert result.exit_code == 0, result.output
    lines = _lines(result.output)
    hub_file = caches["hf_cache"] / "models--org--net" / "snapshots" / COMMIT / "model.pth"
    assert lines["test-san"] == f"test-san: downloaded (sha256 ok) {hub_file}"
    assert lines["test-sam"] == f"test-sam: downloaded (sha256 ok) {cached_path(ZOO['test-sam'])}"
    assert hub_file.read_bytes() == PAYLOAD and cached_path(ZOO["test-sam"]).read_bytes() == PAYLOAD
    sent = len(hub.log) + len(other.log)

    # again: both are found and re-hashed locally, nothing is requested
    again = invoke("models", "download", "test-san", "test-sam", "--quiet")
    assert again.exit_code == 0, again.output
    assert _lines(again.output)["test-san"].startswith("test-san: cached (sha256 ok)")
    assert len(hub.log) + len(other.log) == sent

    # ... and the listing shows where they are
    records = {r["name"]: r for r in json.loads(invoke("models", "--json").output)}
    assert records["test-san"]["path"] == str(hub_file)
    assert records["test-sam"]["path"] == str(cached_path(ZOO["test-sam"]))


def test_models_download_reports_each_failure_and_exits_4(hosts):
    hub, _ = hosts
    hub.force_status = 404
    result = invoke("models", "download", "test-san", "test-sam", "--quiet")
    assert result.exit_code == 4
    assert "failed: test-san: cannot download test-san (HTTP 404" in result.output
    assert "test-sam: downloaded (sha256 ok)" in result.output  # the other one still came down
    assert "1 of 2 checkpoints could not be fetched: test-san" in result.output
    assert "Traceback" not in result.output


def test_models_download_needs_a_selection():
    result = invoke("models", "download")
    assert result.exit_code == 2
    assert "--all" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("variable", ["OVSS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_models_download_makes_no_request(hosts, variable, monkeypatch):
    hub, other = hosts
    attempts = forbid_connections(monkeypatch)
    # the test entries on the fake hosts, and real zoo entries (Hub and other hosts)
    for names in (["test-san", "test-sam"], ["san-vit-b16", "sam-vit-b", "clip-vit-b16-openai"]):
        result = invoke("models", "download", *names, "--quiet", env={variable: "1"})
        assert result.exit_code == 4
        text = " ".join(result.output.split())
        assert f"downloads are off ({variable}=1)" in text and f"run `ovss models download {names[0]}`" in text
    assert attempts == []  # not one socket was even opened towards a host
    assert hub.log == [] and other.log == []
    # the guard does see a download that tries the network: online, the same command is refused
    result = invoke("models", "download", "test-sam", "--quiet")
    assert result.exit_code == 4 and attempts, result.output


def test_models_download_by_method_and_all(hosts, monkeypatch):
    from ovss_cli import zoo

    monkeypatch.setitem(zoo.METHOD_DEFAULTS, "san", ("test-san",))
    monkeypatch.setitem(zoo.METHOD_DEFAULTS, "sam", ("test-sam",))
    result = invoke("models", "download", "--method", "san", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(_lines(result.output)) == ["test-san"]
    assert _lines(result.output)["test-san"].startswith("test-san: downloaded (sha256 ok)")
    monkeypatch.setattr(zoo, "ZOO", {k: v for k, v in zoo.ZOO.items() if k.startswith("test-")})
    result = invoke("models", "download", "--all", "--method", "sam", "--quiet")  # every checkpoint sam uses
    assert result.exit_code == 0, result.output
    assert sorted(_lines(result.output)) == ["test-sam"]
    assert _lines(result.output)["test-sam"].startswith("test-sam: downloaded (sha256 ok)")
    result = invoke("models", "download", "--all", "--quiet", "--no-verify")
    assert result.exit_code == 0, result.output
    assert sorted(_lines(result.output)) == ["test-sam", "test-san"]
    assert all(" cached (not re-hashed) " in line for line in _lines(result.output).values())
    refused = invoke("models", "download", "test-san", "--method", "sam")
    assert refused.exit_code == 2 and "which --method sam does not use" in " ".join(refused.output.split())


def test_models_download_shows_progress(hosts, monkeypatch):
    """Without --quiet: a bar for the file from the other host, huggingface_hub's own bars left on
    for the Hub file, and a bar while a cached copy is checked; --quiet shows none of them."""
    import huggingface_hub

    hub_bars = []
    real = huggingface_hub.hf_hub_download

    def watched(*args, **kwargs):
        hub_bars.append(not huggingface_hub.utils.are_progress_bars_disabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", watched)
    result = invoke("models", "download", "test-san", "test-sam")
    assert result.exit_code == 0, result.output
    assert hub_bars == [True]
    assert re.search(r"test-sam ━+ 150\.0/150\.0 kB", result.output), result.output
    again = invoke("models", "download", "test-san")
    assert re.search(r"checking test-san ━+ 150\.0/150\.0 kB", again.output), again.output
    (cached_path(ZOO["test-sam"])).unlink()
    quiet = invoke("models", "download", "test-san", "test-sam", "--quiet")
    assert quiet.exit_code == 0 and "━" not in quiet.output and "kB" not in quiet.output
    assert hub_bars == [True]  # the Hub file was cached: no second Hub download


@pytest.mark.parametrize("variable", ["OVSS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_segment_names_the_download_command(hosts, sample_images, tmp_path, variable, monkeypatch):
    """A compute node without internet: the default SAN checkpoint is missing, the run stops
    with exit 4 before any request, naming the command that fetches it."""
    hub, other = hosts
    attempts = forbid_connections(monkeypatch)
    result = invoke("segment", str(sample_images / "cat.png"), "--classes", "cat", "--out", str(tmp_path / "o"),
                    env={variable: "1"})
    assert result.exit_code == 4
    text = " ".join(result.output.split())
    assert "san-vit-b16 is not in the cache and downloads are off" in text
    assert "run `ovss models download san-vit-b16` on a machine with internet access" in text
    assert "Traceback" not in text
    assert hub.log == [] and other.log == [] and attempts == []


def test_models_json_parses(caches):
    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["name"] for r in records] == list(ZOO)
    for record in records:
        entry = ZOO[record["name"]]
        assert record["kind"] == entry.kind and record["size"] == entry.size and record["sha256"] == entry.sha256
        assert record["path"] is None  # fresh caches
        if isinstance(entry.source, HubFile):
            assert record["source"] == {"type": "huggingface", "repo_id": entry.source.repo_id,
                                        "filename": entry.filename, "revision": entry.source.revision}
        else:
            assert record["source"] == {"type": "url", "url": entry.url}
    placed = cached_path(ZOO["sam-vit-b"])
    placed.parent.mkdir(parents=True)
    with placed.open("wb") as handle:
        handle.truncate(ZOO["sam-vit-b"].size)
    records = {r["name"]: r for r in json.loads(invoke("models", "--json").output)}
    assert records["sam-vit-b"]["path"] == str(placed)


def test_models_table_still_lists():
    result = invoke("models")
    assert result.exit_code == 0
    assert "san-vit-b16" in result.output and "clip-vit-b16-openai" in result.output


def test_version():
    import open_clip
    import torch

    result = invoke("--version")
    assert result.exit_code == 0, result.output
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.output.splitlines()}
    assert lines["ovss"] == metadata.version("ovss-cli")
    assert lines["python"].startswith(platform.python_version() + " ")
    assert lines["torch"].startswith(torch.__version__ + " (")
    if not torch.cuda.is_available():
        assert "no GPU" in lines["torch"] or "CPU-only" in lines["torch"]
    else:  # pragma: no cover - GPU machines
        assert f"CUDA {torch.version.cuda}" in lines["torch"]
    assert lines["open_clip"] == open_clip.__version__
    assert lines["segment_anything"] == metadata.version("segment-anything")
    assert "huggingface_hub" in lines


def test_shell_completion(tmp_path, monkeypatch):
    # the shell named explicitly, as a user would on a login node: otherwise Typer asks shellingham
    # which shell started this process, and the answer depends on how the tests were launched
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    script = invoke("--show-completion", "bash")
    assert script.exit_code == 0 and "_OVSS_COMPLETE=complete_bash" in script.output
    # the completion protocol the installed script speaks: sub-commands, then zoo names
    words = invoke(env={"_OVSS_COMPLETE": "complete_bash", "COMP_WORDS": "ovss models dow", "COMP_CWORD": "2"})
    assert words.output.split() == ["download"]
    names = invoke(env={"_OVSS_COMPLETE": "complete_bash", "COMP_WORDS": "ovss models download sam-vit",
                        "COMP_CWORD": "3"})
    assert names.output.split() == ["sam-vit-b", "sam-vit-l", "sam-vit-h"]
    monkeypatch.setenv("HOME", str(tmp_path))
    installed = invoke("--install-completion", "bash")
    assert installed.exit_code == 0, installed.output
    assert (tmp_path / ".bash_completions" / "ovss.sh").read_text().strip()
    assert ".bash_completions/ovss.sh" in (tmp_path / ".bashrc").read_text()
