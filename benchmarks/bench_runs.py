"""How `ovss segment` scales: folder size, vocabulary size, reader threads, torchrun processes,
and the cost of resuming. Every run is the real CLI in its own process (peak RSS is that run's).

- scaling: 10 / 100 / 1000 small images (the small seeded SAN of the tests, images at their own
  size) - time should grow linearly and peak memory stay flat;
- vocabulary: 10 / 150 / 847 classes with a full-size SAN ViT-B/16 (random weights) - time per
  image, and the one-off cost of encoding the names (first run, empty text cache);
- --workers 0 vs 2, and 2 torchrun processes vs 1 (same small model, 480 x 640 JPEGs, so decoding
  and writing weigh as they do for real photos);
- resume: re-running a finished 1000-image run (everything is skipped).

    python benchmarks/bench_runs.py [--skip-vocabulary]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.results import machine_description, write_section  # noqa: E402


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB of the process tree's largest process) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0


def ovss(*args: str) -> list[str]:
    return [sys.executable, "-m", "ovss_cli", *args]


def make_images(folder: Path, count: int, size: tuple[int, int], suffix: str = ".png") -> Path:
    from helpers import write_image

    for i in range(count):
        write_image(folder / f"{i // 100:03d}" / f"img{i:05d}{suffix}", i, size)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-vocabulary", action="store_true", help="leave out the ViT-B/16 vocabulary runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    import torch

    from helpers import write_seeded_san
    from ovss_cli.datasets import benchmark_class_names
    from ovss_cli.models.san.checkpoint import build_random_san, save_san_checkpoint
    from ovss_cli.models.san.config import SAN_CONFIGS

    work = Path(tempfile.mkdtemp(prefix="ovss-bench-runs-"))
    env = {**os.environ, "OVSS_HOME": str(work / "home")}
    lines: list[str] = []
    try:
        tiny = write_seeded_san(work / "tiny-san.pth")
        small = ["--classes", "cat,sofa,window", "--weights", str(tiny), "--distractors", "none",
                 "--resize-short", "0", "--device", "cpu", "--quiet"]

        # -- folder size
        lines += ["### Folder size (small seeded SAN, 64 x 85 PNGs at their own size, 3 classes)", "",
                  "| images | seconds | ms / image | peak RSS (MiB) | re-run, all done before (s) |",
                  "| --- | --- | --- | --- | --- |"]
        timed(ovss("segment", str(make_images(work / "warm", 2, (64, 85))), *small, "--out", str(work / "w")), env)
        runs: dict[int, tuple[float, float, float]] = {}
        for count in (10, 100, 1000):
            images = make_images(work / f"in{count}", count, (64, 85))
            out = work / f"out{count}"
            seconds, rss = timed(ovss("segment", str(images), *small, "--out", str(out)), env)
            again, _ = timed(ovss("segment", str(images), *small, "--out", str(out)), env)
            runs[count] = (seconds, rss, again)
            lines.append(f"| {count} | {seconds:.1f} | {1000 * seconds / count:.0f} | {rss:.0f} | {again:.1f} |")
            print(lines[-1])
        (t10, r10, _), (t100, _, _), (t1000, r1000, again1000) = runs[10], runs[100], runs[1000]
        lines += ["", "Times include process start-up (importing torch, loading the model: a few seconds), which is "
                  "why 10 images cost more per image. The last column is resuming a finished run: the walk, one "
                  "state lookup per image, and rewriting manifest.jsonl and coco.json.", "",
                  f"- Linear growth: each image past the first 10 costs {1000 * (t100 - t10) / 90:.0f} ms (10 -> 100) "
                  f"and {1000 * (t1000 - t100) / 900:.0f} ms (100 -> 1000).",
                  f"- Flat memory: peak RSS {r1000:.0f} MiB for 1000 images against {r10:.0f} MiB for 10 "
                  f"({100 * (r1000 / r10 - 1):+.1f}%).",
                  f"- Resume: skipping 1000 finished images takes {again1000:.1f} s, "
                  f"{100 * again1000 / t1000:.0f}% of processing them (start-up included).", ""]

        # -- readers and processes
        photos = make_images(work / "photos", 100, (480, 640), ".jpg")
        lines += ["### Reader threads and torchrun processes (small seeded SAN, 100 JPEGs of 480 x 640, all formats)", "",
                  "| configuration | seconds | images/s |", "| --- | --- | --- |"]
        configs = [("--workers 0 (read and write in the main thread)", ovss("segment", str(photos), *small,
                                                                             "--workers", "0", "--out", str(work / "p0"))),
                   ("--workers 2 (reader threads, writer thread)", ovss("segment", str(photos), *small,
                                                                        "--workers", "2", "--out", str(work / "p2"))),
                   ("1 process, 1 thread (OMP_NUM_THREADS=1, as each torchrun process)",
                    ovss("segment", str(photos), *small, "--out", str(work / "p1")))]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        configs.append(("torchrun, 2 processes (gloo, 1 thread each)",
                        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                         "127.0.0.1", "--master-port", str(port), "-m", "ovss_cli", "segment", str(photos), *small,
                         "--out", str(work / "tr")]))
        best: dict[str, float] = {}
        for _ in range(3):  # configurations take turns; best of 3
            for name, command in configs:
                for out in ("p0", "p2", "p1", "tr"):
                    shutil.rmtree(work / out, ignore_errors=True)
                one_thread = "OMP_NUM_THREADS" in name
                seconds, _ = timed(command, {**env, "OMP_NUM_THREADS": "1"} if one_thread else env)
                best[name] = min(best.get(name, float("inf")), seconds)
        for name, _ in configs:
            lines.append(f"| {name} | {best[name]:.1f} | {100 / best[name]:.1f} |")
            print(lines[-1])
        lines += ["", "Best of 3, the configurations taking turns; times include start-up (torchrun starts two "
                  "interpreters).", ""]

        # -- vocabulary size
        if not args.skip_vocabulary:
            big = work / "san-vit-b16-random.pth"
            save_san_checkpoint(build_random_san(SAN_CONFIGS["san-vit-b16"], seed=0), big)
            three = make_images(work / "three", 3, (480, 640), ".jpg")
            names = [n.strip() for n in benchmark_class_names("ade847.txt")]  # whole names: all 847 distinct
            thirteen = make_images(work / "thirteen", 13, (480, 640), ".jpg")
            lines += ["### Vocabulary size (SAN ViT-B/16, random weights, JPEGs of 480 x 640, short side 640, "
                      "no distractors)", "",
                      "| classes | first run over 3 images, text cache empty (s) | text encoding, once (s) | "
                      "s / image (13 - 3 images, cache warm) |",
                      "| --- | --- | --- | --- |"]
            for count in (10, 150, 847):
                classes = work / f"classes{count}.txt"
                classes.write_text("\n".join(names[:count]) + "\n")
                common = ["--classes-file", str(classes), "--weights", str(big), "--distractors", "none",
                          "--device", "cpu", "--quiet"]
                home = {**env, "OVSS_HOME": str(work / f"home{count}")}
                cold, _ = timed(ovss("segment", str(three), *common, "--out", str(work / f"v{count}a")), home)
                warm, _ = timed(ovss("segment", str(three), *common, "--out", str(work / f"v{count}b")), home)
                warm13, _ = timed(ovss("segment", str(thirteen), *common, "--out", str(work / f"v{count}c")), home)
                lines.append(f"| {count} | {cold:.1f} | {cold - warm:.1f} | {(warm13 - warm) / 10:.2f} |")
                print(lines[-1])
            lines += ["", "The per-image time is the difference between a 13-image and a 3-image run with a warm text "
                      "cache, so start-up and model loading cancel out. The text cost is paid once per vocabulary and "
                      "CLIP: later runs read the embeddings from the cache.", ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads per process unless said otherwise; "
              "each figure is one run unless said otherwise.")
    write_section(args.out, "segment at scale: folders, vocabularies, workers, torchrun, resume",
                  machine_description(), header + "\n\n" + "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
