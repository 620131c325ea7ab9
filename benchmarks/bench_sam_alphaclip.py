"""SAM + Alpha-CLIP on CPU: the batched mask classifier against a straightforward per-mask loop.

Full-size models with random weights: SAM ViT-B and Alpha-CLIP ViT-B/16 (official shapes).
Masks come from a colour clustering of the sample photos (connected regions of >= 100 px),
so every configuration classifies the same realistic region shapes; SAM's own cost (image
encoder fp32 vs bf16) is timed separately.

- straightforward loop: for each mask, re-blur the image, build its region, and classify it with
  one fp32 forward of the model on (image, text, alpha), as the official ``model(image, text,
  alpha)`` call does (text features recomputed for every mask);
- loop, text cached: the same, but the vocabulary is encoded once (isolates batching + bf16);
- batched fp32: blur once per image, text once, regions in chunks of 8, one forward per chunk
  (the exact path);
- batched bf16: the same under bf16 autocast (the fast path: matmul weights stored in bf16,
  attention as per-head matmuls, which beat the fused CPU kernel here).

Every path computes the last transformer block for the class token only (the only token the
features use).

Label agreement is the share of masks whose arg-max class equals the loop's.
Results: benchmarks/RESULTS.md, section "SAM + Alpha-CLIP".

    python benchmarks/bench_sam_alphaclip.py [--images cat.png,coffee.png,rocket.jpg]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import machine_description, write_section  # noqa: E402
from ovss_cli.clip.model import CLIP_CONFIGS  # noqa: E402
from ovss_cli.clip.templates import get_templates  # noqa: E402
from ovss_cli.io.images import read_image  # noqa: E402
from ovss_cli.models.sam_alphaclip.alpha_clip import AlphaClip  # noqa: E402
from ovss_cli.models.sam_alphaclip.preprocess import preprocess_alpha, preprocess_pixels  # noqa: E402
from ovss_cli.models.sam_alphaclip.proposals import SAM_ARCHS, AutocastImageEncoder, build_sam  # noqa: E402
from ovss_cli.models.sam_alphaclip.regions import blur_image, region_fn  # noqa: E402
from ovss_cli.models.sam_alphaclip.segmenter import MaskClassifier, class_probabilities  # noqa: E402
from ovss_cli.vocabulary import Vocabulary  # noqa: E402

VOCAB = Vocabulary.from_names(
    "cat,person,cup,table,rocket,sky,smoke,grass,wall,floor,tree,car,road,building,water,plate,spoon,chair,window,cloud".split(",")
)


def region_masks(image: np.ndarray, k: int = 8, min_area: int = 100, max_masks: int = 48) -> list[np.ndarray]:
    """Connected regions of a k-means colour quantisation, largest first."""
    data = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2)).reshape(-1, 3).astype(np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    cv2.setRNGSeed(0)
    _, _, centres = cv2.kmeans(data, k, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    dist = ((image.reshape(-1, 1, 3).astype(np.float32) - centres[None]) ** 2).sum(-1)
    quant = dist.argmin(1).reshape(image.shape[:2])
    masks = []
    for c in range(k):
        n, comp = cv2.connectedComponents((quant == c).astype(np.uint8))
        for i in range(1, n):
            m = comp == i
            if m.sum() >= min_area:
                masks.append(m)
    masks.sort(key=lambda m: -int(m.sum()))
    return masks[:max_masks]


def loop_classify(classifier: MaskClassifier, image: np.ndarray, masks: list[np.ndarray],
                  cache_text: bool) -> np.ndarray:
    """Per mask: re-blur, build the region, one fp32 forward (and, unless ``cache_text``,
    encode the vocabulary again, as a model(image, text, alpha) call does)."""
    text = classifier.text_classifier(VOCAB)
    size = classifier.model.image_size
    out = []
    for mask in masks:
        if not cache_text:
            with torch.no_grad():
                text = torch.nn.functional.normalize(classifier.model.encode_text(
                    [classifier.prompts.templates[0].format(n) for n in VOCAB.prompt_names]), dim=-1)
        blurred = blur_image(image) if classifier.region == "blur" else None
        px, m = region_fn(classifier.region, image, blurred)(mask)
        pixels = preprocess_pixels(px, size)[None]
        alpha = preprocess_alpha(torch.from_numpy(m)[None], size)
        out.append(classifier.logits(pixels, alpha, text))
    return class_probabilities(torch.cat(out), VOCAB).numpy()


def matmul_gflops(dtype: torch.dtype) -> float:
    """Throughput of one ViT-B MLP-sized linear layer (8 masks x 197 tokens) in ``dtype``."""
    x = torch.randn(8 * 197, 768).to(dtype)
    w = torch.randn(3072, 768).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    start, n = time.perf_counter(), 20
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    return 2 * x.shape[0] * 768 * 3072 * n / (time.perf_counter() - start) / 1e9


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="cat.png,coffee.png,rocket.jpg")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the fastest is reported")
    args = parser.parse_args()
    device = torch.device("cpu")
    images = [read_image(REPO / "sample_images" / n) for n in args.images.split(",")]
    masks = [region_masks(im) for im in images]
    n_masks = sum(len(m) for m in masks)

    torch.manual_seed(0)
    alpha_clip = AlphaClip(CLIP_CONFIGS["ViT-B-16"]).eval().requires_grad_(False)
    torch.nn.init.normal_(alpha_clip.visual.conv1_alpha.weight, std=0.02)
    templates = get_templates("photo")

    lines = [
        f"Random-weight SAM ViT-B and Alpha-CLIP ViT-B/16 (official shapes), {len(images)} sample photos "
        f"({args.images}), {n_masks} masks from a colour clustering (>= 100 px each), vocabulary of {len(VOCAB)} "
        f"classes, torch {torch.__version__}, {torch.get_num_threads()} threads; each time is the best of "
        f"{args.repeat} runs, the paths taking turns.",
        "",
        "### Mask classification (Alpha-CLIP)",
        "",
        "| region | path | seconds | s / mask | speed-up vs straightforward loop | vs loop with text cached | same label as loop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    alpha_clip_bf16 = copy.deepcopy(alpha_clip)  # the bf16 classifier stores its matmul weights in bf16
    for region in ("blur", "crop"):
        exact = MaskClassifier(alpha_clip, device, "fp32", templates, region=region, batch_size=8)
        fast = MaskClassifier(alpha_clip_bf16, device, "bf16", templates, region=region, batch_size=8)
        exact.text_classifier(VOCAB)  # encode the vocabulary once, outside the timings
        fast.text_classifier(VOCAB)
        paths = {"straightforward loop, fp32": lambda im, ms: loop_classify(exact, im, ms, False),
                 "loop, text cached, fp32": lambda im, ms: loop_classify(exact, im, ms, True),
                 "batched, fp32": lambda im, ms: exact.classify(im, ms, VOCAB),
                 "batched, bf16": lambda im, ms: fast.classify(im, ms, VOCAB)}
        label_of, best = {}, dict.fromkeys(paths, float("inf"))
        for _ in range(args.repeat):  # best of N, paths interleaved: this machine is shared and noisy
            for name, fn in paths.items():
                probs, seconds = [], 0.0
                for im, ms in zip(images, masks):
                    p, s = timed(fn, im, ms)
                    probs.append(p)
                    seconds += s
                label_of[name] = np.concatenate(probs).argmax(1)
                best[name] = min(best[name], seconds)
                print(f"{region:5s} {name}: {seconds:.1f} s")
        results = {name: (label_of[name], best[name]) for name in paths}
        base_labels, base_s = results["straightforward loop, fp32"]
        cached_s = results["loop, text cached, fp32"][1]
        for name, (labels, seconds) in results.items():
            agree = float((labels == base_labels).mean())
            lines.append(f"| {region} | {name} | {seconds:.1f} | {seconds / n_masks:.3f} | {base_s / seconds:.2f}x | "
                         f"{cached_s / seconds:.2f}x | {100 * agree:.1f}% |")

    # SAM's own cost on one photo
    torch.manual_seed(0)
    sam = build_sam(SAM_ARCHS["vit_b"]).requires_grad_(False)
    image = images[0]
    x = sam.preprocess(torch.from_numpy(cv2.resize(image, (1024, int(1024 * image.shape[0] / image.shape[1]))))
                       .permute(2, 0, 1)[None].float())
    sam_rows = []
    encoders = {"fp32": sam.image_encoder,
                "bf16": AutocastImageEncoder(copy.deepcopy(sam.image_encoder), device, "bf16")}
    with torch.no_grad():
        for precision, encoder in encoders.items():
            _, seconds = timed(encoder, x)
            sam_rows.append(f"| image encoder (1024 x 1024), {precision} | {seconds:.1f} |")
            print(f"SAM encoder {precision}: {seconds:.1f} s")
    fp32_gflops, bf16_gflops = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    lines += ["", f"Matrix multiply on this CPU (the bulk of Alpha-CLIP's time): fp32 {fp32_gflops:.0f} GFLOP/s, "
              f"bf16 {bf16_gflops:.0f} GFLOP/s, {bf16_gflops / fp32_gflops:.2f}x; this bounds what bf16 can "
              "buy here (the CPU has AVX512-BF16 but no AMX)."]
    lines += ["", "### SAM image encoder (one photo, once per image)", "", "| step | seconds |", "| --- | --- |", *sam_rows,
              "", "SAM's mask decoder and the generator's filtering run in fp32 so its IoU and stability "
              "thresholds stay exact; they are not timed here because random weights give noise masks "
              "whose RLE bookkeeping is unrepresentatively slow."]
    write_section(args.out, "SAM + Alpha-CLIP", machine_description(), "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
