"""Throughput and peak memory of `ovss segment` with a full-size SAN ViT-B/16 (random weights).

Each configuration runs the real CLI in its own process over the sample images (repeated to
a few dozen inputs) so that peak RSS belongs to that run alone. Results go to
benchmarks/RESULTS.md (section "segment: SAN ViT-B/16") together with the machine.

    python benchmarks/bench_segment.py [--repeat 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine_description, write_section  # noqa: E402

CLASSES = "cat,person,cup,rocket,sky,table,grass,wall,floor,tree"


def run_cli(args: list[str]) -> tuple[float, float, int]:
    """Run `python -m ovss_cli ...`; returns (seconds, peak RSS in MiB, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ovss_cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    return seconds, usage.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status)


def reference_agreement() -> float | None:
    """bf16 vs fp32 label agreement of the reference tiny SAN on its fixture (if present)."""
    ref = os.environ.get("OVSS_REFERENCE_DIR")
    if not ref or not Path(ref, "san", "tiny-seed0.fixture.pth").is_file():
        return None
    import torch

    from ovss_cli import load_segmenter

    fixture = torch.load(Path(ref, "san", "tiny-seed0.fixture.pth"), weights_only=True)
    image = fixture["image_rgb_uint8"].permute(1, 2, 0).numpy()
    labels = []
    for precision in ("fp32", "bf16"):
        seg = load_segmenter("san", weights=str(Path(ref, "san", "tiny-seed0.weights.pth")),
                             clip_config=fixture["clip_config"], precision=precision, resize_short=None)
        labels.append(seg.predict(image, fixture["vocabulary"]).labels)
    return float((labels[0] == labels[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of each sample image (5 images each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    import torch

    from ovss_cli.models.san.checkpoint import build_random_san, save_san_checkpoint
    from ovss_cli.models.san.config import SAN_CONFIGS

    work = Path(tempfile.mkdtemp(prefix="ovss-bench-"))
    try:
        weights = work / "san-vit-b16-random.pth"
        save_san_checkpoint(build_random_san(SAN_CONFIGS["san-vit-b16"], seed=0), weights)
        images = work / "images"
        images.mkdir()
        samples = sorted(p for p in (REPO / "sample_images").iterdir() if p.suffix in {".png", ".jpg"})
        for r in range(args.repeat):
            for p in samples:
                shutil.copy(p, images / f"{p.stem}_{r}{p.suffix}")
        n = len(samples) * args.repeat

        # Warm the text-embedding cache once (a vocabulary is encoded on first use only), so the
        # runs below measure images; the warm-up's own time is reported.
        os.environ["OVSS_HOME"] = str(work / "home")
        one = work / "one"
        one.mkdir()
        shutil.copy(samples[0], one / samples[0].name)
        warm_seconds, _, code = run_cli(["segment", str(one), "--classes", CLASSES, "--weights", str(weights), "--out",
                                         str(work / "warm"), "--device", args.device, "--quiet"])
        if code != 0:
            raise SystemExit(f"warm-up run failed: exit {code}")
        rows = []
        labels: dict[str, Path] = {}
        configs = [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
        for precision, batch in configs:
            out = work / f"out-{precision}-{batch}"
            seconds, rss, code = run_cli([
                "segment", str(images), "--classes", CLASSES, "--weights", str(weights), "--out", str(out),
                "--device", args.device, "--precision", precision, "--batch-size", str(batch), "--quiet",
            ])
            if code != 0:
                raise SystemExit(f"benchmark run failed ({precision}, batch {batch}): exit {code}")
            labels[f"{precision}-{batch}"] = out / "labels"
            rows.append((precision, batch, n, seconds, n / seconds, rss))
            print(f"{precision} batch {batch}: {n} images in {seconds:.1f} s = {n / seconds:.2f} img/s, peak RSS {rss:.0f} MiB")

        # how far bf16 labels agree with the exact fp32 path
        import cv2

        agree, total = 0, 0
        for f in sorted(labels["fp32-1"].iterdir()):
            a = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            b = cv2.imread(str(labels["bf16-1"] / f.name), cv2.IMREAD_UNCHANGED)
            agree += int((a == b).sum())
            total += a.size
        agreement = agree / total
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Full-size SAN ViT-B/16 (random weights), `ovss segment` over {n} sample images "
        f"({len(samples)} photos x {args.repeat}, short side resized to 640), vocabulary of "
        f"{len(CLASSES.split(','))} classes, device `{args.device}`, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, default distractors (coco-all). Wall time includes process start-up and "
        f"model loading; the vocabulary's text embeddings come from the cache (the first run ever of this vocabulary, "
        f"one image, took {warm_seconds:.1f} s including encoding its {len(CLASSES.split(','))} classes and the "
        f"distractors with the 14 templates).",
        "",
        "| precision | batch | images | seconds | images/s | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {p} | {b} | {k} | {s:.1f} | {r:.2f} | {m:.0f} |" for p, b, k, s, r, m in rows]
    lines += ["", f"bf16 vs fp32 (batch 1): {100 * agreement:.2f}% of pixels get the same label (random weights give "
              "nearly constant label maps, so this says little)."]
    reference = reference_agreement()
    if reference is not None:
        lines.append(f"On the official tiny SAN of the reference folder, whose output varies over its fixture image, "
                     f"bf16 and fp32 agree on {100 * reference:.2f}% of pixels.")
    write_section(args.out, "segment: SAN ViT-B/16", machine_description(), "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
