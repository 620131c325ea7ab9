"""SAN: official key lists, parity with the official outputs, inference details."""
import json

import numpy as np
import pytest
import torch

from helpers import random_image, tiny_san_config
from ovss_cli import load_segmenter
from ovss_cli.errors import WeightsError
from ovss_cli.models.san.checkpoint import build_random_san, save_san_checkpoint
from ovss_cli.models.san.config import SAN_CONFIGS, SanConfig
from ovss_cli.models.san.model import SanModel
from ovss_cli.models.san.segmenter import resize_image, shortest_edge_size
from ovss_cli.vocabulary import parse_class_lines


def read_key_file(path):
    keys = {}
    for line in path.read_text().splitlines():
        name, shape = line.split(" ", 1)
        keys[name] = tuple(json.loads(shape))
    return keys


def model_keys(cfg: SanConfig):
    with torch.device("meta"):
        model = SanModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model,keyfile", [("san-vit-b16", "keys-vit-b16.txt"), ("san-vit-l14", "keys-vit-l14.txt")])
def test_state_dict_matches_official_key_list(reference_dir, model, keyfile):
    expected = read_key_file(reference_dir / "san" / keyfile)
    assert model_keys(SAN_CONFIGS[model]) == expected


def test_tiny_state_dict_matches_official_key_list(reference_dir):
    fixture = torch.load(reference_dir / "san" / "tiny-seed0.fixture.pth", weights_only=True)
    expected = read_key_file(reference_dir / "san" / "keys-tiny.txt")
    assert model_keys(SanConfig(clip=fixture["clip_config"])) == expected


@pytest.fixture(scope="module")
def tiny_official(reference_dir):
    fixture = torch.load(reference_dir / "san" / "tiny-seed0.fixture.pth", weights_only=True)
    segmenter = load_segmenter(
        "san",
        weights=str(reference_dir / "san" / "tiny-seed0.weights.pth"),
        clip_config=fixture["clip_config"],
        device="cpu",
        resize_short=None,
    )
    return segmenter, fixture


# Relative error of the mask logits that floating-point evaluation order alone causes: measured
# 1.8e-6 of each query's largest |logit| between thread counts and CPU instruction sets.
MASK_LOGIT_EPS = 2e-5


def rounding_sensitivity(segmenter, image: np.ndarray, vocabulary, eps: float = MASK_LOGIT_EPS) -> torch.Tensor:
    """C x H x W bound on how far ``sem_seg`` may move when every query's mask logits move by
    ``eps`` times that query's largest |logit|: sum_q p_qc * max sigma' * eps * M_q (the mean-value
    theorem on each sigmoid).

    The seeded reference weights give mask logits near 1e6, so a sigmoid is a step and the few
    pixels where an upsampled logit crosses zero depend on the summation order (CPU type, thread
    count). Everywhere else the bound is ~0 and parity must hold to 1e-4.
    """
    from ovss_cli.vocabulary import as_vocabulary

    vocab = as_vocabulary(vocabulary)
    view = segmenter._views(0, image)[0]
    padded = segmenter._padded_size(view.tensor)
    h, w = view.tensor.shape[-2:]
    batch = torch.zeros(1, 3, *padded)
    batch[0, :, :h, :w] = view.tensor
    with torch.no_grad():
        mask_logits, class_logits = segmenter.model(batch, segmenter.classifier(vocab))
    m, probs = mask_logits[-1][0], class_logits[-1][0].softmax(-1)[:, :-1]
    up = torch.nn.functional.interpolate(m[None], size=padded, mode="bilinear", align_corners=False)[0, :, :h, :w]
    delta = eps * m.flatten(1).abs().amax(1)[:, None, None]
    s = (up.abs() - delta).clamp_min(0).sigmoid()
    return torch.einsum("qc,qhw->chw", probs, s * (1 - s) * delta)


def test_parity_with_official_sem_seg(tiny_official):
    segmenter, fixture = tiny_official
    image = fixture["image_rgb_uint8"].permute(1, 2, 0).numpy()
    pred = segmenter.predict(image, fixture["vocabulary"], with_scores=True)
    ref = fixture["sem_seg"]
    assert pred.scores.shape == ref.shape
    strict = 1e-4 * ref.abs().max()
    sensitivity = rounding_sensitivity(segmenter, image, fixture["vocabulary"])
    # the allowance is confined to the zero crossings: the comparison keeps its teeth
    assert (sensitivity > strict).float().mean() < 1e-3
    assert ((pred.scores - ref).abs() <= strict + sensitivity).all()
    # labels: equal wherever rounding cannot change the reference's winner
    top2 = ref.topk(2, dim=0).values
    decided = (top2[0] - top2[1] >= 2 * sensitivity.amax(0)).numpy()
    assert decided.mean() > 0.999
    assert np.array_equal(pred.labels[decided], ref.argmax(0).numpy()[decided])
    assert (pred.labels == ref.argmax(0).numpy()).mean() >= 0.9999


def test_text_embeddings_are_cached(tiny_official):
    segmenter, fixture = tiny_official
    image = random_image(64, 96)
    before = segmenter.prompts.names_encoded
    segmenter.predict(image, ["zebra", "giraffe"])
    segmenter.predict(image, ["zebra", "giraffe"])
    segmenter.predict(image, ["giraffe", "zebra", "lion"])
    assert segmenter.prompts.names_encoded - before == 3


def test_a_name_too_long_for_clip_is_warned_about_even_from_the_disk_cache(tmp_path):
    """The warning concerns the name, not the encoding: a later run that reads the embedding from
    the text cache warns too, once per encoder however many images ask for it."""
    import warnings

    from ovss_cli.clip.templates import get_templates
    from ovss_cli.clip.text import PromptEncoder
    from ovss_cli.errors import OvssWarning

    model = build_random_san(tiny_san_config())
    long_name = "a " + "huge " * 80 + "red sofa"
    for run in ("computes", "reads the cache"):
        prompts = PromptEncoder(model.ov_classifier, get_templates("vild"), cache_dir=tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                prompts.embed(["cat", long_name])
        messages = [str(w.message) for w in caught if issubclass(w.category, OvssWarning)]
        assert len(messages) == 1 and "'a huge huge" in messages[0] and "77-token" in messages[0], run
        assert prompts.names_encoded == (2 if run == "computes" else 0), run


def test_shortest_edge_size_follows_detectron2():
    assert shortest_edge_size(480, 640, 640, 2560) == (640, 853)  # 853.33 -> 853
    assert shortest_edge_size(500, 375, 640, 2560) == (853, 640)
    assert shortest_edge_size(100, 1000, 640, 2560) == (256, 2560)  # long side capped
    assert shortest_edge_size(333, 500, 640, 2560) == (640, 961)  # 960.96 -> 961 (round half up)


def test_resize_uses_pil_bilinear():
    from PIL import Image

    img = random_image(30, 50)
    out = resize_image(img, (60, 100))
    expected = np.asarray(Image.fromarray(img).resize((100, 60), Image.BILINEAR))
    assert np.array_equal(out, expected)


def test_synonyms_take_the_best_name():
    vocab = parse_class_lines(["cat: kitty", "sofa"])
    scores = torch.tensor([[[1.0, 5.0]], [[3.0, 2.0]], [[0.5, 0.5]]])  # names: cat, kitty, sofa
    merged = vocab.best_name_per_class(scores, dim=0)
    assert torch.equal(merged, torch.tensor([[[3.0, 5.0]], [[0.5, 0.5]]]))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "seeded.pth"
    save_san_checkpoint(build_random_san(tiny_san_config(), seed=1), path)
    return load_segmenter("san", weights=str(path), device="cpu"), path


def test_output_is_at_input_size_and_labels_are_argmax(seeded):
    segmenter, _ = seeded
    pred = segmenter.predict(random_image(123, 77), "cat,sofa,window", with_scores=True)
    assert pred.scores.shape == (3, 123, 77)
    assert pred.labels.shape == (123, 77)
    assert np.array_equal(pred.labels, pred.scores.argmax(0).numpy())


def test_batch_equals_single(seeded):
    segmenter, _ = seeded
    images = [random_image(100, 150, seed=s) for s in range(3)] + [random_image(90, 90, seed=9)]
    batch = segmenter.predict_batch(images, ["cat", "sofa"], with_scores=True)
    for image, pred in zip(images, batch):
        single = segmenter.predict(image, ["cat", "sofa"], with_scores=True)
        assert torch.allclose(single.scores, pred.scores, atol=1e-5, rtol=1e-5)


def test_our_checkpoint_carries_its_config(seeded):
    _, path = seeded
    ckpt = torch.load(path, weights_only=True)
    assert SanConfig.from_dict(ckpt["ovss_config"]) == tiny_san_config()


def test_wrong_checkpoint_is_a_clear_error(reference_dir):
    # The official tiny checkpoint does not fit the ViT-B/16 architecture.
    with pytest.raises(WeightsError) as err:
        load_segmenter("san", weights=str(reference_dir / "san" / "tiny-seed0.weights.pth"), device="cpu")
    msg = str(err.value)
    assert "tiny-seed0.weights.pth does not match san-vit-b16" in msg and "--clip-config" in msg


def test_text_embeddings_persist_across_runs(seeded, tmp_path, monkeypatch):
    _, path = seeded
    monkeypatch.setenv("OVSS_TEXT_CACHE", "1")
    monkeypatch.setenv("OVSS_HOME", str(tmp_path))
    first = load_segmenter("san", weights=str(path))
    a = first.embed_names(["zebra", "giraffe"])
    assert first.prompts.names_encoded == 2
    assert len(list((tmp_path / "text-embeddings").glob("*.pt"))) == 1
    second = load_segmenter("san", weights=str(path))  # a new process would do the same
    b = second.embed_names(["giraffe", "zebra", "lion"])
    assert second.prompts.names_encoded == 1  # only "lion" is new
    assert torch.equal(b[:2], a.flip(0))
    other = load_segmenter("san", weights=str(path), templates="photo")  # other templates: other cache
    other.embed_names(["zebra"])
    assert other.prompts.names_encoded == 1
    (tmp_path / "text-embeddings").chmod(0o500)  # read-only cache: still works
    try:
        load_segmenter("san", weights=str(path)).embed_names(["tiger"])
    finally:
        (tmp_path / "text-embeddings").chmod(0o700)
