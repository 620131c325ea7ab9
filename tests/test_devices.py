"""Both methods on a GPU, simulated (tests/fake_cuda.py): results come back to the host, equal
the CPU's, and SAN's heavy work stays on the device."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from fake_cuda import FakeCuda, HostDeviceError, on_device
from helpers import build_layout, random_image, write_seeded_alpha_clip, write_seeded_sam
from ovss_cli import load_segmenter
from ovss_cli.datasets import open_dataset
from ovss_cli.evaluate import evaluate_dataset
from ovss_cli.io.images import iter_inputs
from ovss_cli.segment import segment_images
from ovss_cli.vocabulary import parse_class_list

VOCAB = parse_class_list("cat,sofa").with_distractors(["lamp", "window", "floor"])
SAM_VOCAB = parse_class_list("cat,sofa,lamp")  # the seeded Alpha-CLIP gives every mask to a distractor


@pytest.fixture
def gpu(monkeypatch):
    """A simulated CUDA device: `--device cuda` resolves, and device rules are enforced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return FakeCuda


def test_the_simulator_enforces_device_rules(gpu):
    with gpu():
        x = torch.ones(3, device="cuda")
        assert on_device(x) and x.device.type == "cuda"
        with pytest.raises(HostDeviceError, match="numpy"):
            x.numpy()
        with pytest.raises(HostDeviceError, match="same device"):
            x + torch.ones(3)
        assert on_device(x * torch.tensor(2.0))  # a 0-dim host tensor may mix, as on CUDA
        assert not on_device(x.cpu()) and x.cpu().numpy().tolist() == [1.0, 1.0, 1.0]
        layer = torch.nn.Linear(3, 2).to("cuda")
        assert on_device(layer.weight) and on_device(layer(x))


@pytest.fixture(scope="module")
def sam_options(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam")
    clip, alpha = write_seeded_alpha_clip(folder)
    return dict(weights=str(alpha), clip_weights=str(clip), sam_weights=str(write_seeded_sam(folder / "sam.pth")),
                points_per_side=1, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_score=0.0)


def _same(a, b) -> None:
    assert isinstance(a.labels, np.ndarray) and np.array_equal(a.labels, b.labels)
    assert isinstance(a.confidence, np.ndarray) and np.allclose(a.confidence, b.confidence, atol=1e-6)
    assert not on_device(a.scores) and torch.allclose(a.scores, b.scores, atol=1e-6)


def test_san_on_a_gpu_returns_host_results_equal_to_the_cpu(gpu, seeded_san):
    image = random_image(90, 120, seed=3)
    expected = load_segmenter("san", weights=str(seeded_san), device="cpu").predict(image, VOCAB, with_scores=True)
    with gpu(large=image.shape[0] * image.shape[1]) as sim:
        segmenter = load_segmenter("san", weights=str(seeded_san), device="auto", precision="fp32")
        assert segmenter.device.type == "cuda"  # --device auto picks the GPU when there is one
        assert all(on_device(p) for p in segmenter.model.parameters())
        got = segmenter.predict(image, VOCAB, with_scores=True)
        sim.host_ops.clear()
        labels_only = segmenter.predict(image, VOCAB)
    _same(got, expected)
    assert np.array_equal(labels_only.labels, expected.labels) and labels_only.scores is None
    # the only large host-side work is reading the image in and the labels out: the network,
    # the upsampling and the arg-max over classes and distractors all ran on the device
    assert {name for name, _ in sim.host_ops} <= {"from_numpy", "numpy"}, sim.host_ops
    assert sim.device_ops > 100


def test_sam_on_a_gpu_returns_host_results_equal_to_the_cpu(gpu, sam_options):
    image = random_image(60, 80, seed=5)
    expected = load_segmenter("sam", device="cpu", **sam_options).predict(image, SAM_VOCAB, with_scores=True)
    with gpu():
        got = load_segmenter("sam", device="cuda", precision="fp32", **sam_options).predict(image, SAM_VOCAB,
                                                                                            with_scores=True)
    _same(got, expected)
    assert expected.segments and [s.class_index for s in got.segments] == [s.class_index for s in expected.segments]


@pytest.mark.parametrize("method", ["san", "sam"])
def test_segment_and_evaluate_on_a_gpu_equal_the_cpu(gpu, seeded_san, sam_options, tmp_path, method):
    options = dict(weights=str(seeded_san)) if method == "san" else sam_options
    vocab = VOCAB if method == "san" else SAM_VOCAB
    data = tmp_path / "data"
    build_layout(data, "voc20", ["a"], size=(24, 32))
    dataset = open_dataset("voc20", data)
    photos = [data / "VOC2012" / "JPEGImages" / "a.jpg"]
    runs = {}
    for device in ("cpu", "cuda"):
        with gpu() if device == "cuda" else contextlib.nullcontext():
            segmenter = load_segmenter(method, device=device, precision="fp32", **options)
            summary = segment_images(segmenter, iter_inputs([str(p) for p in photos]), vocab, tmp_path / device,
                                     formats=("png", "coco", "jsonl"))
            evaluation = evaluate_dataset(segmenter, dataset)
        assert summary.images_ok == 1 and summary.images_failed == 0
        assert evaluation.images == 1 and evaluation.failed == 0
        runs[device] = evaluation
    assert (tmp_path / "cpu" / "labels/a.png").read_bytes() == (tmp_path / "cuda" / "labels/a.png").read_bytes()
    coco = [json.loads((tmp_path / d / "coco.json").read_text())["annotations"] for d in ("cpu", "cuda")]
    assert coco[0] and [a["segmentation"] for a in coco[0]] == [a["segmentation"] for a in coco[1]]
    assert np.array_equal(runs["cpu"].confusion.matrix, runs["cuda"].confusion.matrix)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, native):
    """Emulated bf16 is several times slower than fp32: asking for it there is worth a warning;
    fp32 and CPUs with native bf16 are quiet."""
    import warnings

    from ovss_cli import runtime
    from ovss_cli.errors import OvssWarning

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.resolve_precision("bf16", cpu) == "bf16"
        assert runtime.resolve_precision("fp32", cpu) == "fp32"
        assert runtime.resolve_precision("auto", cpu) == "fp32"
    said = [str(w.message) for w in caught if issubclass(w.category, OvssWarning)]
    if native:
        assert said == []
    else:
        assert len(said) == 1 and "emulated" in said[0] and "--precision fp32" in said[0]
