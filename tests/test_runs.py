"""Large folders and many machines: a run never reads its own outputs, resumes after a kill
(byte-identical outputs), shards and merges, and runs as several torchrun processes."""
from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import build_layout, write_image
from ovss_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
CLASSES = "cat,sofa,window"
FAST = ("--distractors", "none", "--resize-short", "0")  # small vocabulary, images at their own (small) size
PUBLISHED = ("classes.json", "coco.json", "manifest.jsonl")


def ovss_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ovss_cli", *args]


def run(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(ovss_command(*args), capture_output=True, text=True, cwd=cwd, input=input, timeout=900)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def published_files(out: Path) -> dict[str, bytes]:
    """Every file a run publishes (not its internal state under .ovss), by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".ovss" not in p.relative_to(out).parts}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 small images in nested folders (two of them with the same stem)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(24):
        write_image(root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.{'png' if i % 4 == 0 else 'jpg'}", i, (24, 32))
    write_image(root / "img01.png", 99, (24, 32))  # same stem as img01.jpg: gets img01_2
    return root


@pytest.fixture(scope="module")
def reference_run(photos, seeded_san, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = run("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(out),
               "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    return out


# --- outputs never become inputs ---------------------------------------------------------------


def test_an_output_folder_inside_the_input_folder_is_never_read(tmp_path, seeded_san):
    photos = tmp_path / "photos"
    for i in range(4):
        write_image(photos / f"p{i}.jpg", i, (24, 32))
    args = ["segment", str(photos), "--classes", "person,cup,cat,rocket,sky", "--weights", str(seeded_san),
            "--out", str(photos / "out"), *FAST]
    first = run(*args, "--quiet")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (photos / "out" / "labels").iterdir()) == [f"p{i}.png" for i in range(4)]
    again = run(*args, "--overwrite", "--format", "png")  # the out folder now exists and is full of PNGs
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (photos / "out" / "labels").iterdir()) == [f"p{i}.png" for i in range(4)]
    assert "left out 1 input(s) inside the output folder" in " ".join(again.stderr.split())
    # paths on stdin that point into the output folder are left out too, with a warning
    stdin = f"{photos / 'p0.jpg'}\n{photos / 'out' / 'labels' / 'p1.png'}\n"
    piped = run("segment", "-", "--classes", "cat", "--weights", str(seeded_san), "--out", str(photos / "out"),
                "--overwrite", "--quiet", *FAST, input=stdin)
    assert piped.returncode == 0, piped.stderr
    assert "inside the output folder" in piped.stderr and "p1.png" in piped.stderr
    lines = (photos / "out" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["rel"] for line in lines] == ["p0.jpg"]


# --- resume ------------------------------------------------------------------------------------


def test_a_run_killed_at_random_moments_finishes_byte_identical(photos, seeded_san, reference_run, tmp_path):
    """SIGKILL at 6 random moments (each after a random number of finished images plus a random
    few milliseconds, so kills land inside writes too), then the same command to the end."""
    out = tmp_path / "out"
    command = ovss_command("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san),
                           "--out", str(out), "--quiet", *FAST)
    rng = random.Random(int(os.environ.get("OVSS_KILL_SEED", "20261125")))
    total = len(published_files(reference_run)) // 2  # a label PNG and an overlay per image
    kills, finished = 0, False
    for target in sorted(rng.sample(range(1, total - 3), 6)):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            labels = out / "labels"
            if labels.is_dir() and sum(1 for _ in labels.rglob("*.png")) >= target:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.wait()
            assert finished or not (out / "manifest.jsonl").exists()  # a killed run publishes nothing
        else:
            finished = True
    assert kills >= 5
    final = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert published_files(out) == published_files(reference_run)
    rels = [json.loads(line)["rel"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rels) == len(set(rels)) == 25
    assert not list(out.rglob("*.tmp"))


def test_a_resumed_run_skips_what_is_done_and_refuses_other_settings(photos, seeded_san, reference_run, tmp_path):
    out = tmp_path / "out"
    base = ["segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(out), *FAST]
    assert invoke(*base, "--quiet").exit_code == 0
    (out / "labels" / "img05.png").unlink()  # a lost output file is redone
    again = invoke(*base)
    assert again.exit_code == 0, again.output
    assert "1 ok, 0 failed, 24 done before (skipped)" in " ".join(again.output.split())
    assert published_files(out) == published_files(reference_run)
    for changed, fragment in ((["--classes", "cat,dog,window"], "vocabulary.classes"),
                              (["--resize-short", "48"], "resize_short: None before, 48 now"),
                              (["--format", "png"], "formats"),
                              (["--distractors", "coco-stuff"], "vocabulary.distractors")):
        args = [a for a in base]
        if changed[0] in args:
            args[args.index(changed[0]) + 1] = changed[1]
        else:
            args += changed
        refused = invoke(*args, "--quiet")
        assert refused.exit_code == 2, refused.output
        text = " ".join(refused.output.split())
        assert "holds the outputs of a run with other settings" in text and fragment in text, text
        assert "--overwrite" in text
    redo = invoke(*base[:3], "cat,dog,window", *base[4:], "--overwrite", "--quiet")
    assert redo.exit_code == 0, redo.output
    legend = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in legend["classes"]] == ["cat", "dog", "window"]


def test_dry_run_lists_what_would_be_done_without_loading_a_model(photos, seeded_san, reference_run, tmp_path,
                                                                   monkeypatch):
    from ovss_cli import cli

    out = tmp_path / "out"
    args = ["segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(out), *FAST]
    assert invoke(*args, "--quiet", "--shard", "0/2").exit_code == 0
    done = [json.loads(line)["outputs"]["png"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    (out / done[0]).unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(cli, "build_segmenter", no_model)
    result = invoke(*args, "--dry-run", "--shard", "0/2")
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert len(lines) == 13  # shard 0 of 2 of 25 inputs
    assert [status for status, _ in lines].count("new") == 1 and [status for status, _ in lines].count("done") == 12
    everything = invoke(*args, "--dry-run")  # the other shard's inputs are new here
    assert [line.split("\t")[0] for line in everything.stdout.splitlines()].count("new") == 13
    other = invoke(*args[:3], "cat", *args[4:], "--dry-run")
    assert other.exit_code == 2 and "other settings" in other.output


# --- shards and merge ------------------------------------------------------------------------


def test_three_segment_shards_merged_equal_one_run(photos, seeded_san, reference_run, tmp_path):
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        result = invoke("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san),
                        "--out", str(out), "--shard", f"{i}/3", "--quiet", *FAST)
        assert result.exit_code == 0, result.output
        shards.append(out)
    counts = [len(json.loads(s.joinpath("coco.json").read_text())["images"]) for s in shards]
    assert counts == [9, 8, 8]  # positions 0, 3, 6, ... / 1, 4, ... / 2, 5, ...
    merged = tmp_path / "merged"
    result = invoke("merge", *map(str, shards), "--out", str(merged))
    assert result.exit_code == 0, result.output
    assert published_files(merged) == published_files(reference_run)
    # the merged folder is a finished run of the same settings: running it again does nothing
    again = invoke("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(merged),
                   *FAST)
    assert "0 ok, 0 failed, 25 done before" in " ".join(again.output.split())


def test_merge_refuses_shards_of_different_runs(photos, seeded_san, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("segment", str(photos), "--classes", "cat,sofa", "--weights", str(seeded_san), "--out", str(a),
                  "--shard", "0/2", "--quiet", *FAST).exit_code == 0
    assert invoke("segment", str(photos), "--classes", "cat,dog", "--weights", str(seeded_san), "--out", str(b),
                  "--shard", "1/2", "--quiet", *FAST).exit_code == 0
    result = invoke("merge", str(a), str(b), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2
    assert f"{b} was made with other settings" in " ".join(result.output.split())
    bad = invoke("segment", str(photos), "--classes", "cat", "--shard", "3/3")
    assert bad.exit_code == 2 and "index must be 0..2" in bad.output


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    build_layout(root, "voc20", [f"s{i:02d}" for i in range(10)], size=(20, 24))
    return root


def evaluate_args(voc: Path, seeded_san: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--dataset", "voc20", "--data-root", str(voc), "--weights", str(seeded_san),
            "--resize-short", "0", "--out", str(out), "--quiet", *extra]


def same_evaluation(a: Path, b: Path) -> None:
    """The same metrics and confusion matrix (timings aside)."""
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    for report in (ma, mb):
        report.pop("seconds"), report.pop("images_per_second")
    assert ma == mb
    assert np.array_equal(np.load(a / "confusion.npy"), np.load(b / "confusion.npy"))


def test_three_evaluate_shards_merged_equal_one_run(voc, seeded_san, tmp_path):
    assert invoke(*evaluate_args(voc, seeded_san, tmp_path / "whole")).exit_code == 0
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        assert invoke(*evaluate_args(voc, seeded_san, out, "--shard", f"{i}/3")).exit_code == 0
        assert json.loads((out / "metrics.json").read_text())["shard"] == {"index": i, "count": 3}
        shards.append(out)
    result = invoke("merge", *map(str, shards), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    same_evaluation(tmp_path / "whole", tmp_path / "merged")
    partial = invoke("merge", str(shards[0]), str(shards[1]), "--out", str(tmp_path / "m2"))
    assert partial.exit_code == 2 and "only 2 of 3 shards" in partial.output


# --- torchrun ----------------------------------------------------------------------------------


def torchrun(*args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "ovss_cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_two_torchrun_processes_segment_as_one(photos, seeded_san, tmp_path):
    """torchrun gives each process one thread (OMP_NUM_THREADS=1), so the one-process run it is
    compared with uses one thread too: float sums then agree bit for bit."""
    one = tmp_path / "one"
    args = ["segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--device", "cpu", *FAST]
    single = subprocess.run(ovss_command(*args, "--out", str(one), "--quiet"), capture_output=True, text=True,
                            timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    out = tmp_path / "out"
    proc = torchrun(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert published_files(out) == published_files(one)
    assert sorted(p.name for p in (out / ".ovss").glob("*.sqlite")) == ["main.rank-0-of-2.sqlite",
                                                                      "main.rank-1-of-2.sqlite"]
    assert proc.stderr.count("ovss segment") == 1 and "25 ok" in proc.stderr  # rank 0 reports for both


def test_two_torchrun_processes_evaluate_as_one(voc, seeded_san, tmp_path):
    assert invoke(*evaluate_args(voc, seeded_san, tmp_path / "one")).exit_code == 0
    proc = torchrun(*evaluate_args(voc, seeded_san, tmp_path / "two", "--device", "cpu"))
    assert proc.returncode == 0, proc.stderr
    same_evaluation(tmp_path / "one", tmp_path / "two")


# --- keeping the device fed ----------------------------------------------------------------------


def test_readers_and_writer_threads_change_nothing(photos, seeded_san, reference_run, tmp_path):
    for workers in ("0", "3"):
        out = tmp_path / workers
        result = invoke("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san),
                        "--out", str(out), "--workers", workers, "--quiet", *FAST)
        assert result.exit_code == 0, result.output
        assert published_files(out) == published_files(reference_run)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(photos, seeded_san, tmp_path):
    from ovss_cli.runs.state import RunLock

    out = tmp_path / "out"
    lock = RunLock(out)
    lock.acquire()
    try:
        result = invoke("segment", str(photos), "--classes", "cat", "--weights", str(seeded_san), "--out", str(out))
    finally:
        lock.release()
    assert result.exit_code == 2
    assert f"{out} is being written by another ovss run (pid {os.getpid()})" in " ".join(result.output.split())
