"""Hostile inputs and faults, through the real CLI in subprocesses: nothing good is lost,
nothing is executed, every failure is explained once (cases listed in RELIABILITY.md).

As root (CI), the runs that need file permissions to mean something run without the
capabilities that let root ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from helpers import build_layout, random_image, write_image, write_seeded_san
from ovss_cli import load_segmenter
from ovss_cli.io.images import read_image

REPO = Path(__file__).resolve().parents[1]
AS_ROOT = os.geteuid() == 0
FAST = ["--distractors", "none", "--resize-short", "0", "--device", "cpu"]


# --- running the CLI ------------------------------------------------------------------------


def _obey_file_permissions() -> None:
    """In the child: drop root's power to ignore file permissions (from the bounding set, so the
    program exec'd next starts without it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def ovss(*args, work: Path, input: str | None = None, permissions: bool = False, env: dict | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ovss_cli ARGS`` in ``work``; ``permissions``: file permissions apply even as root."""
    environment = {**os.environ, "HOME": str(work), "OVSS_HOME": str(work / "home"), "PYTHONDONTWRITEBYTECODE": "1",
                   "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ovss_cli", *map(str, args)], cwd=work, input=input,
                          capture_output=True, text=True, timeout=timeout, env=environment,
                          preexec_fn=_obey_file_permissions if permissions and AS_ROOT else None)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "home").mkdir()
    return folder


@pytest.fixture(scope="module")
def san(work) -> Path:
    return write_seeded_san(work / "san.pth")


# --- a folder of 100 inputs, 15 of them bad ---------------------------------------------------


def _png_with_bad_crc(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(random_image(20, 20)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # the chunk's data changes, its CRC does not
    path.write_bytes(bytes(data))


def _header_only_png(path: Path, width: int, height: int) -> None:
    """A valid PNG header announcing ``width`` x ``height`` pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


BAD = {  # name -> what the report must say about it
    "zero.jpg": "file is empty", "empty.png": "file is empty", "truncated.jpg": "cannot read image",
    "cut.png": "cannot read image", "bad-crc.png": "cannot read image", "text.jpg": "not a recognised image",
    "page.png": "not a recognised image", "noise.webp": "not a recognised image",
    "bomb.png": "decompression bomb", "corrupt.tif": "cannot read image", "header-only.bmp": "cannot read image",
    "loop.jpg": "symbolic link loop", "dangling.jpg": "broken symbolic link", "unreadable.jpg": "permission denied",
    "vanished.jpg": "deleted after it was listed",
}


@pytest.fixture(scope="module")
def hostile_folder(work) -> Path:
    folder = work / "photos"
    folder.mkdir()
    good = folder / "good"
    for i in range(74):  # plain good images, some in sub-folders
        write_image(good / f"g{i // 25}" / f"img{i:02d}.{'png' if i % 3 else 'jpg'}", i, (24, 32))
    # unusual but good
    Image.fromarray(random_image(1, 1)).save(folder / "one-pixel.png")
    Image.fromarray(random_image(20, 30)).convert("CMYK").save(folder / "cmyk.jpg")
    cv2.imwrite(str(folder / "gray16.png"), (np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    cv2.imwrite(str(folder / "rgb16.png"), np.random.default_rng(1).integers(0, 65535, (20, 30, 3), dtype=np.uint16))
    Image.fromarray(random_image(20, 30)).convert("P").save(folder / "palette.png")
    Image.fromarray(random_image(20, 30)).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(random_image(20, 30)).convert("L").save(folder / "gray.jpg")
    frames = [Image.fromarray(random_image(20, 30, seed=s)).convert("P") for s in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    pages = [Image.fromarray(random_image(20, 30, seed=s)) for s in (4, 5)]
    pages[0].save(folder / "pages.tif", save_all=True, append_images=pages[1:])
    Image.fromarray(random_image(20, 30)).save(folder / "jpeg-named.png", "JPEG")  # content decides, not the name
    shutil.copy(good / "g0" / "img01.png", os.fsencode(folder) + b"/caf\xe9.png")  # not valid UTF-8
    # bad
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((good / "g0" / "img00.jpg").read_bytes()[:300])
    (folder / "cut.png").write_bytes((good / "g0" / "img01.png").read_bytes()[:200])
    _png_with_bad_crc(folder / "bad-crc.png")
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "page.png").write_text("<html><body>404</body></html>\n")
    (folder / "noise.webp").write_bytes(os.urandom(512))
    _header_only_png(folder / "bomb.png", 40000, 40000)
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(200))
    (folder / "header-only.bmp").write_bytes((good / "g0" / "img00.jpg").read_bytes()[:0] + b"BM" + b"\x00" * 40)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("nowhere/missing.jpg", folder / "dangling.jpg")
    write_image(folder / "unreadable.jpg", 7, (24, 32))
    write_image(folder / "vanished.jpg", 8, (24, 32))
    (folder / "unreadable.jpg").chmod(0o000)
    assert sum(1 for _ in folder.rglob("*")) - 4 == 100  # 100 inputs, 4 sub-folders
    return folder


VANISH_HOOK = textwrap.dedent("""
    # Test hook: delete one file just before ovss reads it (after the walk listed it).
    import os
    victim = os.environ.get("OVSS_TEST_VANISH")
    if victim:
        import ovss_cli.io.images as images
        real = images.read_image_notes
        def read_image_notes(path):
            if os.path.abspath(str(path)) == victim and os.path.exists(victim):
                os.unlink(victim)
            return real(path)
        images.read_image_notes = read_image_notes
""")


ZOO_HOOK = textwrap.dedent("""
    # Test hook: zoo entries on the test's local fake hosts (the real hosts cannot be reached).
    import json
    import os
    spec = os.environ.get("OVSS_TEST_ZOO")
    if spec:
        from ovss_cli.zoo import ZOO, HubFile, UrlFile, ZooEntry
        for e in json.loads(spec):
            source = HubFile(e["repo"], e["file"]) if "repo" in e else UrlFile(e["url"])
            ZOO[e["name"]] = ZooEntry(e["name"], e["kind"], source, e["size"], e["sha256"], "test", e["arch"])
""")


def imread(path: Path) -> np.ndarray | None:
    """cv2.imread, safe for names that are not UTF-8 (cv2.imread crashes on those)."""
    return cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)


def files_are_whole(out: Path) -> None:
    """No temp file, and every output file complete: PNGs decode, JSON parses."""
    for path in out.rglob("*"):
        if not path.is_file() or ".ovss" in path.relative_to(out).parts:
            continue
        assert not path.name.endswith(".tmp"), path
        assert path.stat().st_size > 0, path
        if path.suffix == ".png":
            assert imread(path) is not None, path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_of_hostile_files(hostile_folder, san, work):
    hook = work / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(VANISH_HOOK)
    out = work / "out"
    proc = ovss("segment", hostile_folder, "--classes", "cat,sofa", "--weights", san, "--out", out, "--quiet",
                *FAST, work=work, permissions=True,
                env={"PYTHONPATH": str(hook), "OVSS_TEST_VANISH": str(hostile_folder / "vanished.jpg")})
    assert proc.returncode == 1, proc.stderr
    assert all(line.startswith("failed:") for line in proc.stderr.splitlines()), proc.stderr  # nothing else
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 100 and len({r["rel"] for r in records}) == 100
    failed = {r["rel"]: r["error"] for r in records if not r["ok"]}
    assert set(failed) == set(BAD), sorted(set(failed) ^ set(BAD))
    for name, fragment in BAD.items():
        assert fragment in failed[name], (name, failed[name])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("failed:") and f"/{name}:" in line]
        assert len(lines) == 1, name  # reported once
    # every good image has the outputs a direct prediction gives
    segmenter = load_segmenter("san", weights=str(san), resize_short=None)
    vocab = ["cat", "sofa"]
    for record in records:
        if record["ok"]:
            labels = imread(out / record["outputs"]["png"])
            expected = segmenter.predict(read_image(record["input"]), vocab).labels
            assert np.array_equal(labels, expected.astype(np.uint8)), record["rel"]
    notes = {r["rel"]: r.get("warnings", []) for r in records if r["ok"]}
    assert notes["animated.gif"] == ["first of 3 frames used"] and notes["pages.tif"] == ["first of 2 pages used"]
    assert os.fsdecode(b"caf\xe9.png") in notes  # the non-UTF-8 name went through, and back
    assert (out / "labels" / os.fsdecode(b"caf\xe9.png")).is_file()
    files_are_whole(out)
    assert len(COCO(str(out / "coco.json")).getImgIds()) == 85
    for record in records:  # failed inputs left no output behind
        if not record["ok"]:
            assert not (out / "labels" / Path(record["rel"]).with_suffix(".png")).exists()


def test_folders_without_permissions_fail_their_inputs_not_the_run(work, san):
    """A folder that can be listed but not searched (its files cannot even be stat'ed), one that
    cannot be listed, and a path on stdin into the first: each is a reported failure."""
    folder = work / "locked-tree"
    write_image(folder / "ok.jpg", 1, (24, 32))
    write_image(folder / "no-search" / "a.jpg", 2, (24, 32))
    write_image(folder / "no-list" / "b.jpg", 3, (24, 32))
    (folder / "no-search").chmod(0o644)
    (folder / "no-list").chmod(0o000)
    out = work / "locked-out"
    try:
        proc = ovss("segment", folder, "--classes", "cat", "--weights", san, "--out", out, "--quiet", *FAST,
                    work=work, permissions=True)
        piped = ovss("segment", "-", "--classes", "cat", "--weights", san, "--out", work / "locked-out-2",
                     "--quiet", *FAST, work=work, permissions=True,
                     input=f"{folder / 'ok.jpg'}\n{folder / 'no-search' / 'a.jpg'}\n")
    finally:
        (folder / "no-search").chmod(0o755)
        (folder / "no-list").chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    records = {r["rel"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records["ok.jpg"]["ok"] and (out / "labels" / "ok.png").is_file()
    assert "permission denied" in records["no-search/a.jpg"]["error"]
    assert "cannot list directory" in records["no-list"]["error"]
    assert piped.returncode == 1, piped.stderr
    lines = [json.loads(line) for line in (work / "locked-out-2" / "manifest.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in lines] == [True, False] and "permission denied" in lines[1]["error"]


# --- two runs, one folder ----------------------------------------------------------------------


def test_a_second_run_on_a_busy_folder_stops_and_the_first_is_unharmed(work, san):
    photos = work / "busy"
    for i in range(40):
        write_image(photos / f"b{i:02d}.jpg", i, (24, 32))
    out = work / "busy-out"
    command = [sys.executable, "-m", "ovss_cli", "segment", "--classes", "cat", "--weights", str(san),
               "--out", str(out), "--quiet", *FAST]
    env = {**os.environ, "OVSS_HOME": str(work / "home")}
    # the first run reads its paths from a pipe we hold open, so it is still running (lock
    # held, some images written) for as long as the second run takes
    first = subprocess.Popen([*command, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    paths = [str(photos / f"b{i:02d}.jpg") for i in range(40)]
    first.stdin.write("".join(p + "\n" for p in paths[:5]))
    first.stdin.flush()
    lock = out / ".ovss" / "lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.02)
    second = subprocess.run([*command, str(photos)], capture_output=True, text=True, env=env, timeout=120)
    assert first.poll() is None  # the first was busy all along
    assert second.returncode == 2, second.stderr
    assert f"is being written by another ovss run (pid {first.pid})" in " ".join(second.stderr.split())
    _, err = first.communicate("".join(p + "\n" for p in paths[5:]), timeout=300)
    assert first.returncode == 0, err
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 40
    files_are_whole(out)


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(work):
    mount = work / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        reason = f"cannot mount a size-limited tmpfs here ({proc.stderr.strip() or 'mount failed'})"
        print(f"SKIPPED full-disk test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_cleanly_and_a_rerun_after_freeing_space_completes(work, san, small_disk):
    photos = work / "big-photos"
    for i in range(30):
        write_image(photos / f"p{i:02d}.png", i, (96, 128))  # overlays of noise do not compress: fills 400k fast
    out = small_disk / "out"
    args = ["segment", photos, "--classes", "cat,sofa", "--weights", san, "--out", out, "--quiet", *FAST]
    full = ovss(*args, work=work)
    assert full.returncode == 7, full.stderr
    assert "no space left on the disk" in full.stderr and "run the same command again" in full.stderr
    assert "Traceback" not in full.stderr
    assert not (out / "manifest.jsonl").exists()
    files_are_whole(out)  # no truncated file
    done = sorted(p.name for p in (out / "labels").glob("*.png"))
    assert 0 < len(done) < 30
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    again = ovss(*args, work=work)
    assert again.returncode == 0, again.stderr
    reference = work / "full-reference"
    assert ovss(*args[:6], "--out", reference, "--quiet", *FAST, work=work).returncode == 0
    for rel in ("manifest.jsonl", "coco.json", "classes.json", *[f"labels/p{i:02d}.png" for i in range(30)]):
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel


# --- checkpoints ---------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command (if anything unpickles it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_that_would_run_code_are_refused_without_running_it(work, hostile_folder):
    marker = work / "code-ran"
    evil = work / "evil.pth"
    torch.save({"model": _Payload(marker)}, evil)
    pickle.loads(pickle.dumps(1))  # (pickle itself works here)
    proc = ovss("segment", hostile_folder / "good", "--classes", "cat", "--weights", evil, "--out", work / "o-evil",
                *FAST, work=work)
    assert proc.returncode == 4, proc.stderr
    assert str(evil) in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()  # nothing in it was executed


def test_a_checkpoint_of_another_architecture_names_every_mismatch(work, san, hostile_folder):
    state = torch.load(san, weights_only=True)
    model = state["model"]
    removed = next(k for k in model if k.startswith("side_adapter_network"))
    del model[removed]
    model["extra.weight"] = torch.zeros(3)
    reshaped = next(k for k in model if k.endswith("bg_embed"))
    model[reshaped] = torch.zeros(1, 999)
    other = work / "other-arch.pth"
    torch.save(state, other)
    proc = ovss("segment", hostile_folder / "good", "--classes", "cat", "--weights", other, "--out", work / "o-arch",
                *FAST, work=work)
    assert proc.returncode == 4, proc.stderr
    text = " ".join(proc.stderr.split())
    for fragment in ("missing keys", removed, "unexpected keys", "extra.weight", reshaped, "999"):
        assert fragment in text, fragment


def test_the_wrong_kind_of_model_for_the_method_is_named(work, san, hostile_folder):
    from helpers import write_seeded_alpha_clip, write_seeded_sam

    clip, alpha = write_seeded_alpha_clip(work)
    sam = write_seeded_sam(work / "sam.pth")
    cases = [  # (the options, what the message must say)
        (["--method", "sam", "--weights", alpha, "--clip-weights", san, "--sam-weights", sam],
         f"{san} is a SAN checkpoint, not a CLIP checkpoint (--clip-weights)"),
        (["--method", "sam", "--weights", alpha, "--clip-weights", clip, "--sam-weights", san],
         f"{san} is a SAN checkpoint, not a Segment Anything checkpoint"),
        (["--weights", sam], f"{sam} does not match san-vit-b16"),
    ]
    for options, fragment in cases:
        proc = ovss("segment", hostile_folder / "good", "--classes", "cat", *options, "--out", work / "o-kind",
                    "--device", "cpu", work=work)
        assert proc.returncode == 4, proc.stderr
        assert "Traceback" not in proc.stderr and fragment in " ".join(proc.stderr.split()), proc.stderr
    assert "it looks like a Segment Anything (SAM) checkpoint" in " ".join(proc.stderr.split())


def test_a_cut_download_resumes_and_a_wrong_checksum_is_removed_not_used(work):
    """Through the CLI, for a Hugging Face Hub file and a plain URL: the first transfer drops
    after 10.5 MiB, the download resumes from there (a Range request), and since the bytes are not
    the ones the zoo's sha256 names, the file is deleted and the command fails saying so."""
    import hashlib
    import re

    from fake_hosts import FakeHost, running

    # huggingface_hub writes 10 MiB chunks: a transfer cut after 10.5 MiB has one to resume from
    served = np.random.default_rng(0).integers(0, 256, 11 << 20, dtype=np.uint8).tobytes()
    pinned = hashlib.sha256(served[::-1]).hexdigest()  # the zoo names other content of the same size
    cut = 21 << 19
    hub, other = FakeHost(), FakeHost(files={"/dl/sam.pth": served})
    hub.add_hub_file("org/net", "model.pth", served, commit="9" * 40)
    hub.cut_first_get["/org/net/resolve/main/model.pth"] = cut
    other.cut_first_get["/dl/sam.pth"] = cut
    hook = work / "zoo-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(ZOO_HOOK)
    with running(hub), running(other):
        zoo = [{"name": "hostile-hub", "kind": "san", "repo": "org/net", "file": "model.pth", "size": len(served),
                "sha256": pinned, "arch": "san-vit-b16"},
               {"name": "hostile-url", "kind": "sam", "url": other.base + "/dl/sam.pth", "size": len(served),
                "sha256": pinned, "arch": "vit_b"}]
        env = {"PYTHONPATH": str(hook), "OVSS_TEST_ZOO": json.dumps(zoo), "HF_ENDPOINT": hub.base,
               "HF_HOME": str(work / "hf-home"), "OVSS_HOME": str(work / "dl-home"),
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
        for name, host, prefix in (("hostile-hub", hub, "/org/"), ("hostile-url", other, "/dl/")):
            runs = [ovss("models", "download", name, "--quiet", work=work, env=env)]
            if "run again to resume" in runs[0].stderr:  # the downloader may resume in the same call
                runs.append(ovss("models", "download", name, "--quiet", work=work, env=env))
            final = runs[-1]
            assert final.returncode == 4, final.stderr
            assert "sha256" in final.stderr and name in final.stderr, final.stderr
            ranges = [r.range for r in host.requests_to(prefix) if r.method == "GET"]
            assert ranges[0] is None and len(ranges) >= 2, ranges
            start = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
            assert 0 < start <= cut  # resumed where the cut transfer stopped
        # nothing of the bad downloads is left to be used by a later run
        leftovers = [p for home in (work / "hf-home", work / "dl-home") for p in home.rglob("*")
                     if p.is_file() and p.stat().st_size > 0 and (p.name.endswith(".pth") or p.stat().st_size >= cut)]
        assert leftovers == [], leftovers


# --- vocabularies ----------------------------------------------------------------------------


@pytest.mark.parametrize("classes,fragment", [
    ("", "empty"), (",,,", "entry 1 is empty"), ("Cat, cat", "duplicate class name 'cat'"),
])
def test_bad_vocabularies(work, san, hostile_folder, classes, fragment):
    proc = ovss("segment", hostile_folder / "good", "--classes", classes, "--weights", san, *FAST, work=work)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr


def test_large_long_and_foreign_vocabularies(work, san):
    image = work / "one" / "a.jpg"
    write_image(image, 3, (24, 32))
    classes = work / "10000.txt"
    classes.write_text("".join(f"thing {i}\n" for i in range(10000)))
    proc = ovss("segment", image, "--classes-file", classes, "--weights", san, "--out", work / "o-10k",
                "--templates", "photo", "--format", "png", "--quiet", *FAST, work=work)
    assert proc.returncode == 0, proc.stderr
    label = cv2.imread(str(work / "o-10k" / "labels" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint16 and label.max() < 10000
    long_name = "a very long class name " * 22
    foreign = work / "foreign.txt"
    foreign.write_text(f"猫\nÖlkanne: oil can, Kanne\nroad, route\ntraffic light: signal, stop light\n{long_name}\n",
                       encoding="utf-8")
    proc = ovss("segment", image, "--classes-file", foreign, "--weights", san, "--out", work / "o-foreign",
                "--quiet", *FAST, work=work)
    assert proc.returncode == 0, proc.stderr
    assert "warning: class name 'a very long class name" in proc.stderr and "only its beginning is used" in proc.stderr
    legend = json.loads((work / "o-foreign" / "classes.json").read_text(encoding="utf-8"))
    assert [c["name"] for c in legend["classes"]][:4] == ["猫", "Ölkanne", "road, route", "traffic light"]
    assert legend["classes"][3]["names"] == ["signal", "stop light"]


# --- paths ------------------------------------------------------------------------------------


def test_outputs_stay_inside_out_whatever_the_input_names(work, san):
    inside = work / "names" / "deep" / "dir"
    write_image(inside / "A.jpg", 1, (24, 32))
    write_image(inside / "a.png", 2, (24, 32))
    write_image(work / "names" / "up.jpg", 3, (24, 32))
    out = work / "names-out"
    stdin = f"{inside / 'A.jpg'}\n{inside / 'a.png'}\n../up.jpg\n{inside}/../../up.jpg\n"
    proc = ovss("segment", "-", "--classes", "cat", "--weights", san, "--out", out, "--quiet", *FAST,
                work=work / "names" / "deep", input=stdin)
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.resolve().parents for p in files)
    labels = sorted(p.name for p in (out / "labels").rglob("*.png"))
    assert labels == ["A.png", "a_2.png", "up.png", "up_2.png"]  # case-only and repeated names kept apart


def test_an_unusable_out_is_an_error_before_any_model_loads(work, hostile_folder):
    missing_weights = work / "no-such-weights.pth"  # loading a model would fail with exit 4
    a_file = work / "a-file"
    a_file.write_text("x")
    proc = ovss("segment", hostile_folder / "good", "--classes", "cat", "--weights", missing_weights,
                "--out", a_file, *FAST, work=work)
    assert proc.returncode == 7 and f"--out {a_file} is a file, not a folder" in proc.stderr
    read_only = work / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    proc = ovss("segment", hostile_folder / "good", "--classes", "cat", "--weights", missing_weights,
                "--out", read_only / "out", *FAST, work=work, permissions=True)
    assert proc.returncode == 7, proc.stderr
    assert f"cannot write to --out {read_only / 'out'}" in proc.stderr and "Permission denied" in proc.stderr


# --- datasets ------------------------------------------------------------------------------


def test_bad_labels_are_named_and_never_counted(work, san):
    root = work / "bad-data"
    labels = build_layout(root, "pc59", ["a", "b", "c", "d"], size=(20, 24))
    label_dir = root / "pcontext" / "val" / "label"
    cv2.imwrite(str(label_dir / "b.png"), np.full((20, 24), 77, np.uint8))  # class 77 of 59
    cv2.imwrite(str(label_dir / "c.png"), labels["c"][:10].astype(np.uint8))  # wrong size
    (label_dir / "d.png").unlink()  # missing
    proc = ovss("evaluate", "--dataset", "pc59", "--data-root", root, "--weights", san, "--resize-short", "0",
                "--out", work / "bad-eval", "--quiet", "--device", "cpu", work=work)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((work / "bad-eval" / "metrics.json").read_text())
    assert report["images"] == 1 and report["partial"] and report["failed"] == 3
    reasons = {Path(f["input"]).stem: f["error"] for f in report["failures"]}
    assert "b.png" in reasons["b"] and "77" in reasons["b"]
    assert "c.png" in reasons["c"] and "24x10" in reasons["c"]
    assert "d.png is missing" in reasons["d"]
    # exactly one image's pixels were counted
    assert np.load(work / "bad-eval" / "confusion.npy").sum() == 20 * 24


# --- devices -------------------------------------------------------------------------------


def test_cuda_without_a_gpu_is_a_clear_error(work, san, hostile_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = ovss("segment", hostile_folder / "good", "--classes", "cat", "--weights", san, "--device", "cuda",
                "--out", work / "o-cuda", work=work)
    assert proc.returncode == 2 and "no CUDA GPU is available; use --device cpu" in proc.stderr


def test_an_image_that_runs_out_of_gpu_memory_is_retried_alone_then_on_the_cpu(tmp_path, seeded_san):
    from ovss_cli.io.images import InputWalk
    from ovss_cli.segment import segment_images
    from ovss_cli.segmenter import GPU_FALLBACK_WARNING
    from ovss_cli.vocabulary import parse_class_list

    for i, size in enumerate([(24, 32), (24, 32), (200, 260), (24, 32)]):
        write_image(tmp_path / "in" / f"{i}.jpg", i, size)
    segmenter = load_segmenter("san", weights=str(seeded_san), resize_short=None)
    real_batch, real_single = segmenter.predict_batch, segmenter.predict
    calls = []

    def too_big(images):
        return any(image.shape[0] > 100 for image in images)

    def predict_batch(images, vocabulary, **kwargs):
        calls.append(("batch", len(images)))
        if too_big(images):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batch(images, vocabulary, **kwargs)

    def predict(image, vocabulary, **kwargs):
        calls.append(("single", image.shape[0]))
        if too_big([image]):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_single(image, vocabulary, **kwargs)

    segmenter.predict_batch, segmenter.predict = predict_batch, predict
    vocab = parse_class_list("cat,sofa")
    summary = segment_images(segmenter, InputWalk([str(tmp_path / "in")]), vocab, tmp_path / "out",
                             formats=("png", "jsonl"), batch_size=2)
    assert summary.images_ok == 4 and summary.images_failed == 0
    assert ("batch", 2) in calls and ("single", 200) in calls  # the batch failed, then the big image alone
    records = {json.loads(line)["rel"]: json.loads(line) for line in
               (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()}
    assert records["2.jpg"]["warnings"] == [GPU_FALLBACK_WARNING] and "warnings" not in records["3.jpg"]
    fresh = load_segmenter("san", weights=str(seeded_san), resize_short=None)
    expected = fresh.predict(read_image(tmp_path / "in" / "2.jpg"), vocab).labels
    assert np.array_equal(cv2.imread(str(tmp_path / "out" / "labels" / "2.png"), cv2.IMREAD_UNCHANGED), expected)
    # the fallback is in the run's summary too, and in an evaluation's report
    assert summary.warnings == {GPU_FALLBACK_WARNING: 1}
    from rich.console import Console

    from ovss_cli.datasets import generic_dataset
    from ovss_cli.evaluate import evaluate_dataset, write_evaluation
    from ovss_cli.reporting import print_evaluation, print_segment_summary

    console = Console(record=True, width=200)
    print_segment_summary(summary, console)
    assert f"{GPU_FALLBACK_WARNING} (1 image)" in console.export_text()
    (tmp_path / "labels").mkdir()
    for i in (0, 2):  # a small image and the one that runs out of memory, each with a label
        height, width = read_image(tmp_path / "in" / f"{i}.jpg").shape[:2]
        cv2.imwrite(str(tmp_path / "labels" / f"{i}.png"), np.zeros((height, width), np.uint8))
    for i in (1, 3):
        (tmp_path / "in" / f"{i}.jpg").unlink()
    data = generic_dataset(tmp_path / "in", tmp_path / "labels", ["cat", "sofa"])
    result = evaluate_dataset(segmenter, data)
    assert result.images == 2 and result.warnings == [(str(tmp_path / "in" / "2.jpg"), GPU_FALLBACK_WARNING)]
    write_evaluation(result, tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["warnings"] == [{"input": str(tmp_path / "in" / "2.jpg"), "warning": GPU_FALLBACK_WARNING}]
    console = Console(record=True, width=200)
    print_evaluation(result, console=console)
    assert f"warning {tmp_path / 'in' / '2.jpg'}: {GPU_FALLBACK_WARNING}" in console.export_text()


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly(work, san, sig, code):
    photos = work / f"signal-{code}"
    for i in range(40):
        write_image(photos / f"s{i:02d}.jpg", i, (24, 32))
    out = work / f"signal-{code}-out"
    base = [sys.executable, "-m", "ovss_cli", "segment", str(photos), "--classes", "cat", "--weights", str(san),
            "--out", str(out), "--quiet", *FAST]
    env = {**os.environ, "OVSS_HOME": str(work / "home")}
    proc = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "labels").glob("*.png"))) < 5:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert ("interrupted" if code == 130 else "terminated") in err and "Traceback" not in err
    assert not (out / "manifest.jsonl").exists()
    files_are_whole(out)
    again = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 40
