"""How fast `ovss train-san` trains, and in how much memory.

- CPU: the small seeded SAN (the reference folder's official tiny model when OVSS_REFERENCE_DIR
  is set, else the tests' tiny config) on synthetic 480 x 640 shape images, at a few crop sizes,
  batches and precisions: iterations/s (the mean of the logged iterations after a warm-up) and
  the process's peak RSS.
- GPU (when one is present): SAN ViT-B/16 (random CLIP weights, fresh side adapter) at the
  official batch 32 and 640-pixel crops, bf16: iterations/s and peak GPU memory.

Each run is the real CLI in its own process.

    python benchmarks/bench_train.py [--iters 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.results import machine_description, write_section  # noqa: E402

WARM_UP = 2  # logged iterations left out of the mean


def run(command: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a command; stops the benchmark if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024.0


def iteration_stats(out: Path) -> tuple[float, float | None]:
    """(mean seconds per iteration after the warm-up, peak GPU MiB or None) from log.jsonl."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "seconds_per_iteration" in r][WARM_UP:]
    seconds = sum(r["seconds_per_iteration"] for r in rows) / len(rows)
    memory = max((r["max_memory_mib"] for r in rows if "max_memory_mib" in r), default=None)
    return seconds, memory


def small_model(work: Path) -> tuple[list[str], str]:
    """``--init``/``--clip-config`` arguments of the small model, and its description."""
    ref = os.environ.get("OVSS_REFERENCE_DIR")
    if ref and (Path(ref) / "san" / "tiny-seed0.weights.pth").is_file():
        import torch

        fixture = torch.load(Path(ref) / "san" / "tiny-seed0.fixture.pth", weights_only=True)
        (work / "clip.json").write_text(json.dumps(fixture["clip_config"]))
        return (["--init", str(Path(ref) / "san" / "tiny-seed0.weights.pth"), "--clip-config", str(work / "clip.json")],
                "the official tiny SAN of the reference folder: CLIP ViT width 96, 12 layers; the official side "
                "adapter, width 240, 8 blocks, 100 queries")
    from helpers import write_seeded_san

    return (["--init", str(write_seeded_san(work / "tiny-san.pth"))],
            "the tests' tiny seeded SAN: CLIP width 64, 4 layers; side adapter width 48, 2 blocks, 10 queries")


def random_clip_b16(path: Path) -> Path:
    """An OpenAI-format ViT-B/16 CLIP state dict with random weights (no download here)."""
    import torch

    from ovss_cli.clip.model import CLIP_CONFIGS, build_clip

    torch.manual_seed(0)
    torch.save(build_clip(CLIP_CONFIGS["ViT-B-16"]).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8, help="iterations per CPU configuration")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    import torch

    from helpers import SHAPE_CLASSES, write_shapes_dataset

    work = Path(tempfile.mkdtemp(prefix="ovss-bench-train-"))
    env = {**os.environ, "OVSS_HOME": str(work / "home")}
    lines: list[str] = []
    try:
        images, labels, classes = write_shapes_dataset(work / "data", 16, size=(480, 640), ignore_border=True)
        data_args = ["--images", str(images), "--labels", str(labels), "--classes-file", str(classes)]
        init, described = small_model(work)
        lines += [f"### CPU: small model ({described})", "",
                  f"`ovss train-san` on 16 synthetic 480 x 640 images ({len(SHAPE_CLASSES)} classes), "
                  f"{args.iters} iterations, "
                  f"mean of iterations {WARM_UP + 1}..{args.iters} (an iteration: reading and augmenting its batch, "
                  "forward, matching and losses, backward, clipping, AdamW).", "",
                  "| crop | batch | precision | threads | s / iteration | iterations/s | images/s | peak RSS (MiB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        # one thread per process: on a shared machine two threads mostly wait for each other (the
        # 2-thread row shows how much); on a machine of your own, more threads are faster
        configs = [(128, 4, "fp32", 1), (128, 4, "bf16", 1), (128, 4, "fp32", 2), (320, 4, "fp32", 1),
                   (640, 2, "fp32", 1), (640, 2, "bf16", 1)]
        for crop, batch, precision, threads in configs:
            out = work / f"cpu-{crop}-{batch}-{precision}-{threads}"
            command = [sys.executable, "-m", "ovss_cli", "train-san", *data_args, *init, "--out", str(out),
                       "--iters", str(args.iters), "--batch-size", str(batch), "--crop-size", str(crop),
                       "--precision", precision, "--device", "cpu", "--log-every", "1", "--checkpoint-every",
                       str(10 * args.iters), "--quiet"]
            _, rss = run(command, {**env, "OMP_NUM_THREADS": str(threads)})
            seconds, _ = iteration_stats(out)
            lines.append(f"| {crop} | {batch} | {precision} | {threads} | {seconds:.2f} | {1 / seconds:.2f} | "
                         f"{batch / seconds:.2f} | {rss:.0f} |")
            print(lines[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
        lines += ["", "Peak RSS is the whole process's (model, optimizer state, data, activations of the batch). "
                  "Rows run one after another, so other jobs on a shared machine weigh on each differently.", ""]

        lines += ["### GPU: SAN ViT-B/16, batch 32, 640-pixel crops", ""]
        if torch.cuda.is_available():
            clip = random_clip_b16(work / "clip-b16-random.pt")
            out = work / "gpu"
            command = [sys.executable, "-m", "ovss_cli", "train-san", *data_args, "--clip-weights", str(clip),
                       "--out", str(out), "--iters", "30", "--batch-size", "32", "--crop-size", "640",
                       "--device", "cuda", "--precision", "bf16", "--workers", "8", "--log-every", "1",
                       "--checkpoint-every", "1000", "--quiet"]
            run(command, env)
            seconds, memory = iteration_stats(out)
            lines += ["| GPU | precision | s / iteration | images/s | peak GPU memory (MiB) |",
                      "| --- | --- | --- | --- | --- |",
                      f"| {torch.cuda.get_device_name()} | bf16 | {seconds:.3f} | {32 / seconds:.1f} | {memory:.0f} |", "",
                      "Random CLIP weights (OpenAI ViT-B/16 shapes), a fresh side adapter; 30 iterations, the first "
                      f"{WARM_UP} left out.", ""]
        else:
            lines += ["No GPU on this machine: not measured (the script measures it when CUDA is available).", ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (f"torch {torch.__version__}; each figure is one run (the machine may be shared: compare rows of one "
              "section, not across sections).")
    write_section(args.out, "train-san: iterations/s and memory", machine_description(), header + "\n\n" + "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
