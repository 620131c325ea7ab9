"""Small seeded models and synthetic inputs for tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ovss_cli.datasets import DATASETS

# A CLIP small enough for fast CPU tests (the real tokenizer needs vocab_size 49408).
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_san_config():
    from ovss_cli.models.san.config import SanConfig

    return SanConfig(
        clip=TINY_CLIP,
        feature_last_layer=3,
        side_width=48,
        side_depth=2,
        side_heads=2,
        num_queries=10,
        fusion_map=((0, 0), (1, 1), (2, 2)),
        deep_supervision=(1, 2),
        bias_heads=4,
        bias_embed=32,
        bias_mlp=32,
        num_train_classes=5,
    )


def write_seeded_san(path: Path, seed: int = 0) -> Path:
    from ovss_cli.models.san.checkpoint import build_random_san, save_san_checkpoint

    save_san_checkpoint(build_random_san(tiny_san_config(), seed=seed), path)
    return path


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# A small Alpha-CLIP (OpenAI-format CLIP + Alpha-CLIP visual) and a small SAM, both seeded.
TINY_ALPHA_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def write_seeded_alpha_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(clip checkpoint in OpenAI format, Alpha-CLIP visual checkpoint in the released format)."""
    import torch

    from ovss_cli.clip.model import build_clip

    torch.manual_seed(seed)
    clip = build_clip(TINY_ALPHA_CLIP)
    state = {k: v for k, v in clip.state_dict().items()}
    clip_path = folder / "tiny-openai-clip.pt"
    torch.save(state, clip_path)
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual = {k.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias"): v
              for k, v in visual.items()}
    visual["conv1_alpha.weight"] = torch.randn(64, 1, 32, 32) * 0.02
    alpha_path = folder / "tiny-alpha-visual.pth"
    torch.save(visual, alpha_path)
    return clip_path, alpha_path


def write_seeded_sam(path: Path, seed: int = 0) -> Path:
    import torch

    from ovss_cli.models.sam_alphaclip.proposals import SamArch, build_sam

    torch.manual_seed(seed)
    torch.save(build_sam(SamArch(32, 2, 2, (1,))).state_dict(), path)
    return path


# Synthetic datasets in each benchmark's on-disk layout.
H, W = 8, 10
EXPECTED_COUNTS = {
    "ade150": 150,
    "ade847": 847,
    "pc59": 59,
    "pc459": 459,
    "voc20": 20,
    "voc21": 21,
    "cocostuff171": 171,
}




def write_image(path: Path, seed: int, size: tuple[int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size or (H, W)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), rgb)


def make_label(name: str, seed: int, size: tuple[int, int] | None = None) -> np.ndarray:
    spec = DATASETS[name]
    rng = np.random.default_rng(seed)
    label = rng.integers(0, EXPECTED_COUNTS[name], size=size or (H, W)).astype(np.int64)
    label[0, :3] = spec.ignore_label
    return label


def write_label(path: Path, name: str, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = DATASETS[name]
    if name == "voc21":  # official VOC: palette PNG whose indices are the classes
        image = Image.fromarray(label.astype(np.uint8)).convert("P")  # L -> P keeps the values
        palette = np.random.default_rng(1).integers(0, 256, size=768).astype(np.uint8)
        image.putpalette(palette.tolist())
        image.save(path)
    elif spec.label_ext == ".tif":
        assert cv2.imwrite(str(path), label.astype(np.uint16))
    else:
        assert cv2.imwrite(str(path), label.astype(np.uint8))


def build_layout(root: Path, name: str, ids: list[str], size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Images and labels for ``ids`` in the dataset's on-disk layout; returns the labels."""
    spec = DATASETS[name]
    labels = {}
    for n, sample_id in enumerate(ids):
        write_image(root / spec.image_dir / f"{sample_id}{spec.image_ext}", n, size)
        labels[sample_id] = make_label(name, n, size)
        write_label(root / spec.label_dir / f"{sample_id}{spec.label_ext}", name, labels[sample_id])
    if spec.split_file:
        split = root / spec.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{i}\n" for i in ids))
    return labels


# A small generic-layout dataset (images folder, labels folder, classes file) of coloured shapes:
# the one synthetic dataset of the tests and benchmarks (compare, report-check, train-san).
SHAPE_CLASSES = ("background", "red disc", "green square", "blue bar", "yellow triangle")
SHAPE_COLOURS = ((225, 225, 215), (215, 40, 40), (40, 170, 60), (45, 65, 215), (235, 200, 30))


def write_shapes_dataset(root: Path, count: int, *, seed: int = 0, size: int | tuple[int, int] = 96,
                         ignore_border: bool = False) -> tuple[Path, Path, Path]:
    """``count`` seeded images of coloured shapes on a light background, in the generic layout
    that ``ovss evaluate/compare/train-san --images DIR --labels DIR --classes-file F`` read:
    ``root/images/shape_<i>.png`` (RGB, mild noise), ``root/labels/shape_<i>.png`` (uint8 class
    index per pixel, 0 background; with ``ignore_border`` a 2-pixel border of 255, the ignore
    value) and ``root/classes.txt`` (:data:`SHAPE_CLASSES`, one per line).

    ``size`` is the side of square images or (height, width). Each image has a disc, a square,
    a full-width horizontal bar and a triangle (later shapes drawn over earlier ones) at seeded
    places and sizes, so every class covers pixels in most images; the same ``seed`` and
    ``count`` give the same files, and a different seed (a held-out set) other images.
    Returns (images folder, labels folder, classes file)."""
    rng = np.random.default_rng(seed)
    images, labels = Path(root) / "images", Path(root) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    h, w = (size, size) if isinstance(size, int) else size
    s = min(h, w)
    for i in range(count):
        label = np.zeros((h, w), np.uint8)
        r = int(rng.integers(s // 8, s // 4))
        cx, cy = (int(v) for v in rng.integers(r, [w - r, h - r]))
        cv2.circle(label, (cx, cy), r, 1, -1)
        side = int(rng.integers(s // 6, s // 3))
        x, y = (int(v) for v in rng.integers(0, [w - side, h - side]))
        label[y:y + side, x:x + side] = 2
        top, height = int(rng.integers(0, h - h // 8)), max(2, h // 12)
        label[top:top + height] = 3
        corners = rng.integers(0, [w, h], (3, 2)).astype(np.int32)
        cv2.fillPoly(label, [corners], 4)
        image = np.array(SHAPE_COLOURS, np.int16)[label] + rng.integers(-12, 13, (h, w, 3))
        if ignore_border:
            label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"shape_{i}.png")
        Image.fromarray(label).save(labels / f"shape_{i}.png")
    classes = Path(root) / "classes.txt"
    classes.write_text("".join(f"{name}\n" for name in SHAPE_CLASSES))
    return images, labels, classes
