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

import cv2
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
    (root / "notes.txt").write_text("not an image\n")
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


def test_shards_writing_inside_the_input_folder_never_read_each_others_outputs(tmp_path, seeded_san):
    photos = tmp_path / "photos"
    for i in range(6):
        write_image(photos / f"p{i}.jpg", i, (24, 32))
    args = ["segment", str(photos), "--classes", "cat,sofa", "--weights", str(seeded_san), *FAST]
    whole = tmp_path / "whole"
    assert invoke(*args, "--out", str(whole), "--quiet").exit_code == 0
    for i in range(2):
        result = invoke(*args, "--out", str(photos / f"out{i}"), "--shard", f"{i}/2", "--quiet")
        assert result.exit_code == 0, result.output
    # shard 1 met shard 0's output folder inside the input folder, and said so
    assert f"did not enter 1 folder(s) holding another ovss run's outputs: {photos / 'out0'}" in \
        " ".join(result.output.split())
    merged = tmp_path / "merged"
    assert invoke("merge", str(photos / "out0"), str(photos / "out1"), "--out", str(merged)).exit_code == 0
    assert published_files(merged) == published_files(whole)


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
    other_weights = tmp_path / "other.pth"
    other_weights.write_bytes(seeded_san.read_bytes())
    for changed, fragment in ((["--weights", str(other_weights)], "weights.path"),
                              (["--model", "san-vit-l14"], "model: None before, 'san-vit-l14' now")):
        args = [a for a in base]
        if changed[0] in args:
            args[args.index(changed[0]) + 1] = changed[1]
        else:
            args += changed
        refused = run(*args, "--quiet")  # refused before the model loads (a ViT-L would not fit this file)
        assert refused.returncode == 2, refused.stderr
        assert fragment in " ".join(refused.stderr.split())
    same = invoke(*base, "--overwrite")  # the same settings: every image is redone
    assert same.exit_code == 0, same.output
    text = " ".join(same.output.split())
    assert "25 ok, 0 failed" in text and "(skipped)" not in text
    assert published_files(out) == published_files(reference_run)
    redo = invoke(*base[:3], "cat,dog,window", *base[4:], "--overwrite", "--format", "png", "--quiet")
    assert redo.exit_code == 0, redo.output
    legend = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in legend["classes"]] == ["cat", "dog", "window"]
    # nothing of the earlier run is left beside the new one's label PNGs
    assert sorted(published_files(out)) == sorted(["classes.json"] + [
        name for name in published_files(reference_run) if name.startswith("labels/")])


def test_an_interrupted_rerun_of_a_finished_folder_does_not_look_finished(photos, seeded_san, reference_run,
                                                                         tmp_path):
    """A re-run re-tags the rows it reuses: until it completes, the folder must not keep the last
    run's manifest, COCO file or final.json (``ovss merge`` would trust them and drop images)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    command = ovss_command("segment", "-", "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(out),
                           "--quiet", *FAST)
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(f"{photos / 'img02.jpg'}\n")
    proc.stdin.flush()
    lock = out / ".ovss" / "lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.read_text().strip() == str(proc.pid)
                                               and not (out / ".ovss" / "final.json").exists()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # stopped mid-run (it waits for more paths on stdin)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    for name in ("manifest.jsonl", "coco.json", ".ovss/final.json"):
        assert not (out / name).exists(), name
    merged = invoke("merge", str(out), "--out", str(tmp_path / "m"))
    assert merged.exit_code == 2 and "holds no completed run" in merged.output
    again = run("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san), "--out", str(out),
                "--quiet", *FAST)
    assert again.returncode == 0, again.stderr
    assert published_files(out) == published_files(reference_run)


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
    monkeypatch.setattr("ovss_cli.segmenter.load_segmenter", no_model)
    result = invoke(*args, "--dry-run", "--shard", "0/2")
    assert result.exit_code == 0, result.output
    assert "dry run: 13 inputs (1 new, 12 done before)" in result.output
    assert "skipped files that are not images: 1 .txt" in result.output
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
    compared with uses one thread too: float sums then agree bit for bit. A class name longer
    than CLIP's context is warned about once, by rank 0, as in one process."""
    one = tmp_path / "one"
    classes = CLASSES + ",a " + "very " * 80 + "long sofa"
    args = ["segment", str(photos), "--classes", classes, "--weights", str(seeded_san), "--device", "cpu", *FAST]
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
    assert "25/25" in proc.stderr  # rank 0's bar ends with every rank's inputs counted
    assert single.stderr.count("warning: class name 'a very") == 1
    assert proc.stderr.count("warning: class name 'a very") == 1


def test_two_torchrun_processes_evaluate_as_one(voc, seeded_san, tmp_path):
    """With a sample of rank 1's failing: rank 0 reports it, shows every rank's progress and
    writes the metrics; no rank's exit cuts rank 0 short."""
    import shutil

    data = tmp_path / "voc"
    shutil.copytree(voc, data)
    label = next(data.rglob("annotations_detectron2/val/s01.png"))  # position 1: rank 1's
    cv2.imwrite(str(label), np.full((20, 24), 77, np.uint8))  # a class voc20 does not have: s01 fails
    one = invoke(*evaluate_args(data, seeded_san, tmp_path / "one"))
    assert one.exit_code == 1 and (tmp_path / "one" / "metrics.json").is_file(), (one.output, one.exception)
    args = [a for a in evaluate_args(data, seeded_san, tmp_path / "two", "--device", "cpu") if a != "--quiet"]
    proc = torchrun(*args)
    assert proc.returncode == 1, proc.stderr  # rank 0's exit code: a sample failed
    # torchrun's report: the one process that exited non-zero is rank 0, by itself (exit code 1,
    # after writing everything), not killed (-15) because another rank left first
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 1 " in root_cause, proc.stderr
    assert "<NO_OTHER_FAILURES>" in proc.stderr
    same_evaluation(tmp_path / "one", tmp_path / "two")
    bar = " ".join(proc.stderr.split())
    assert "10/10" in bar and "failed 1" in bar  # every rank's samples and failures on rank 0's bar
    assert "failed" in proc.stdout and "s01" in proc.stdout  # rank 1's failure in rank 0's report
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["failed"] == 1


def test_torchrun_ranks_on_gpus_use_their_local_gpu_and_nccl(monkeypatch):
    """No GPU is lent to CI: the CUDA calls are stood in for, and the rank's choices checked."""
    import torch

    from ovss_cli.errors import UsageError
    from ovss_cli.runs import distributed

    calls: dict = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.__setitem__("set_device", device))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kwargs: calls.__setitem__("backend", backend))
    here = socket.gethostname()
    ranks = [("machine-0", 100), ("machine-0", 101), (here, 200), (here, os.getpid())]  # (host, pid) per rank

    def all_gather_object(out, value):
        assert value == (here, os.getpid())
        out[:] = ranks

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of the second machine
    ctx = distributed.start("cuda")
    assert (ctx.rank, ctx.world, ctx.local_rank) == (3, 4, 1)
    assert ctx.local_peers == [200]  # the other rank on this machine (rank 0 waits for such before failing)
    assert ctx.device("cuda") == ctx.device("auto") == "cuda:1"
    assert calls == {"set_device": torch.device("cuda:1"), "backend": "nccl"}
    assert ctx.backend == "nccl" and ctx.comm_device == torch.device("cuda:1")  # collectives on the GPU
    assert distributed.start("cpu").backend == "gloo" and calls["backend"] == "gloo"
    monkeypatch.setenv("LOCAL_RANK", "2")  # more processes than GPUs on the machine
    with pytest.raises(UsageError, match="local rank 2 has no GPU: this machine has 2"):
        distributed.start("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # a scheduler gave this process one GPU of its own
    assert distributed.start("cuda").device("cuda") == "cuda:0"


# --- keeping the device fed ----------------------------------------------------------------------


def test_readers_and_writer_threads_change_nothing(photos, seeded_san, reference_run, tmp_path):
    for workers in ("0", "3"):
        out = tmp_path / workers
        result = invoke("segment", str(photos), "--classes", CLASSES, "--weights", str(seeded_san),
                        "--out", str(out), "--workers", workers, "--quiet", *FAST)
        assert result.exit_code == 0, result.output
        assert published_files(out) == published_files(reference_run)


def test_evaluate_reader_threads_change_nothing(voc, seeded_san, tmp_path):
    for workers in ("0", "1", "3"):
        assert invoke(*evaluate_args(voc, seeded_san, tmp_path / workers, "--workers", workers)).exit_code == 0
    same_evaluation(tmp_path / "0", tmp_path / "1")
    same_evaluation(tmp_path / "0", tmp_path / "3")


@pytest.mark.parametrize("workers", [2, 0])
def test_reading_and_writing_overlap_inference(tmp_path, monkeypatch, workers):
    """With reader threads, image i+1 is being read, and image i-1 written, while image i is in
    the model (each inference waits for those events); with --workers 0 nothing overlaps (the
    control: the same waits time out). Inference runs under torch.inference_mode."""
    import threading

    import torch

    from ovss_cli import segment as seg
    from ovss_cli.io.images import InputWalk
    from ovss_cli.segmenter import Prediction, Segmenter
    from ovss_cli.vocabulary import parse_class_list

    n = 4
    for i in range(n):
        write_image(tmp_path / "in" / f"{i}.jpg", i, (8, 8))
    read = [threading.Event() for _ in range(n)]
    written = [threading.Event() for _ in range(n)]
    real_read, real_write = seg.read_image_notes, seg.write_label_png

    def reading(path):
        read[int(Path(path).stem)].set()
        return real_read(path)

    def writing(path, labels, num_values):
        written[int(Path(path).stem)].set()
        return real_write(path, labels, num_values)

    monkeypatch.setattr(seg, "read_image_notes", reading)
    monkeypatch.setattr(seg, "write_label_png", writing)
    seen: list[tuple[bool, bool, bool]] = []  # (next read began, previous written, inference mode)
    wait = 10 if workers else 0.5

    class Waiting(Segmenter):
        method, model_name = "test", "test"

        def predict(self, image, vocabulary, *, with_scores=False):
            i = len(seen)
            seen.append((i + 1 == n or read[i + 1].wait(wait), i == 0 or written[i - 1].wait(wait),
                         torch.is_inference_mode_enabled()))
            return Prediction(labels=np.zeros(image.shape[:2], np.int32))

        def embed_names(self, names):
            raise AssertionError("not used")

    summary = seg.segment_images(Waiting(), InputWalk([str(tmp_path / "in")]), parse_class_list("cat"),
                                 tmp_path / "out", formats=("png",), workers=workers)
    assert summary.images_ok == n
    assert all(mode for _, _, mode in seen)
    overlapped = [next_read and previous_written for next_read, previous_written, _ in seen]
    assert all(overlapped) if workers else not any(overlapped[1:-1])


def test_a_run_encodes_each_name_once(photos, seeded_san, tmp_path, monkeypatch):
    from ovss_cli import load_segmenter
    from ovss_cli.io.images import InputWalk
    from ovss_cli.segment import segment_images
    from ovss_cli.vocabulary import parse_class_list

    monkeypatch.setenv("OVSS_TEXT_CACHE", "0")  # count real encodes, not reads from the persistent cache
    segmenter = load_segmenter("san", weights=str(seeded_san), resize_short=None, templates="photo")
    vocab = parse_class_list(CLASSES)
    summary = segment_images(segmenter, InputWalk([str(photos)]), vocab, tmp_path / "out", formats=("png",))
    assert summary.images_ok == 25 and segmenter.prompts.names_encoded == 3


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


def test_rank_0_exits_non_zero_only_after_its_machines_other_ranks():
    """torchrun stops every process of a machine once one exits non-zero: rank 0 returns a
    failing exit code only after the other local ranks have exited (a zombie counts as exited),
    and a success at once."""
    from ovss_cli.runs.distributed import Distributed

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        main = Distributed(rank=0, world=2, local_peers=[peer.pid])
        start = time.monotonic()
        assert main.exit_code(0) == 0 and time.monotonic() - start < 0.2  # nothing to wait for
        assert Distributed(rank=1, world=2, local_peers=[peer.pid]).exit_code(1) == 1
        assert peer.poll() is None  # rank 1 did not wait either
        assert main.exit_code(1) == 1
        assert time.monotonic() - start >= 1.0  # waited for the peer ...
        time.sleep(0.1)
        assert peer.poll() == 0  # ... which had exited, unreaped (a zombie counts as exited)
    finally:
        peer.kill()
        peer.wait()
    assert main.exit_code(1, timeout=5) == 1  # a peer gone altogether is not waited for
