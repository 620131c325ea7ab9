"""Finding datasets on disk: the benchmark layouts of :data:`DATASETS`, or any two folders.

Every failure a user can fix is a one-line :class:`DatasetError` naming the path that was
expected and how to produce it; an unknown dataset name is a :class:`UsageError`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DatasetError, UsageError
from ..io.images import IMAGE_EXTENSIONS
from .classes import benchmark_class_names
from .dataset import Sample, SemSegDataset
from .specs import DATASETS, DatasetSpec

# Label files of a custom layout: lossless formats only (a JPEG label would be noise).
LABEL_EXTENSIONS = frozenset({".png", ".tif", ".tiff", ".bmp"})

DEFAULT_ROOT = "datasets"


def dataset_root(data_root: str | os.PathLike[str] | None) -> Path:
    """``--data-root`` if given, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    env = os.environ.get("DETECTRON2_DATASETS")
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT)


def get_spec(name: str) -> DatasetSpec:
    """The benchmark called ``name``; UsageError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def open_dataset(name: str, root: str | os.PathLike[str], split: str = "val") -> SemSegDataset:
    """List benchmark ``name`` under ``root`` (see :func:`dataset_root`) without reading images;
    ``split="train"`` lists its training split (``ovss train-san``).

    Images and labels pair up by relative path without extension; label files without an
    image are dropped (counted in ``unmatched_labels``), as detectron2's loader does. An image
    without a label is kept: evaluating it fails, naming the missing file, and the result is
    marked partial (it is never silently left out) -- except where one image folder serves
    every split (VOC2012/JPEGImages: ``labels_define_split``), where the labels are the split.
    """
    spec = get_spec(name)
    root = Path(root)
    image_dir, label_dir, split_file = spec.folders(split)
    images_dir = root / image_dir
    labels_dir = root / label_dir
    hint = f"prepare it with {spec.preparation}, or pass --data-root"
    images = _list_or_fail(spec.name, "images", images_dir, {spec.image_ext}, hint)
    labels = _list_or_fail(spec.name, "labels", labels_dir, {spec.label_ext}, hint)
    if split_file is not None:
        ids = _split_ids(spec, root / split_file, hint)
        for sample_id in ids:
            if sample_id not in labels:
                raise DatasetError(
                    f"{spec.name}: {sample_id} is listed in {root / split_file} but its label "
                    f"{labels_dir / (sample_id + spec.label_ext)} is missing; {hint}"
                )
            if sample_id not in images:
                raise DatasetError(
                    f"{spec.name}: {sample_id} is listed in {root / split_file} but its image "
                    f"{images_dir / (sample_id + spec.image_ext)} is missing; {hint}"
                )
        unmatched = 0
    else:
        matched = images.keys() & labels.keys()
        unmatched = len(labels) - len(matched)
        if not matched:
            raise DatasetError(
                f"{spec.name}: no label in {labels_dir} has an image of the same name in "
                f"{images_dir}; {hint}"
            )
        # an image without its label stays a sample: evaluating it fails and is reported;
        # unless the image folder is every split's, where such an image is another split's
        ids = sorted(matched) if spec.labels_define_split else sorted(images)
    pairs = [Sample(i, images[i], labels.get(i, labels_dir / f"{i}{spec.label_ext}")) for i in ids]
    return SemSegDataset(
        spec.name if split == "val" else f"{spec.name}-{split}",
        benchmark_class_names(spec.classes_file),
        spec.ignore_label,
        pairs,
        spec=spec,
        unmatched_labels=unmatched,
    )


def generic_dataset(
    images_dir: str | os.PathLike[str],
    labels_dir: str | os.PathLike[str],
    class_names: Sequence[str],
    ignore_label: int = 255,
    name: str = "custom",
) -> SemSegDataset:
    """A dataset from ``--images DIR --labels DIR --classes-file F``.

    Each image (any readable image extension, folders walked recursively) needs a label
    (.png/.tif/.tiff/.bmp) at the same relative path, extension aside; the first image
    without one is named in the error. Labels without an image are ignored.
    """
    if not class_names:
        raise UsageError("the class list is empty: give one class per line in --classes-file")
    if 0 <= ignore_label < len(class_names):
        raise UsageError(
            f"ignore label {ignore_label} is also a class index (0..{len(class_names) - 1}); "
            "choose a value outside the classes, e.g. 255"
        )
    images_path, labels_path = Path(images_dir), Path(labels_dir)
    images = _list_custom(images_path, IMAGE_EXTENSIONS, "images")
    labels = _list_custom(labels_path, LABEL_EXTENSIONS, "labels")
    missing = [i for i in images if i not in labels]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            f"no label for image {images[missing[0]]}{more}: expected "
            f"{labels_path / missing[0]}.png (or .tif/.bmp); labels match images by relative path"
        )
    pairs = [Sample(i, images[i], labels[i]) for i in sorted(images)]
    return SemSegDataset(name, class_names, ignore_label, pairs)


def list_datasets(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per benchmark for an ``ovss datasets`` table: whether and where it was found.

    Keys: name, title, classes (count), found, images (count, or None when not found),
    path (the image folder looked at), preparation (how to produce it), problem (the
    reason it was not found, else None).
    """
    rows = []
    for spec in DATASETS.values():
        row: dict[str, Any] = {
            "name": spec.name,
            "title": spec.title,
            "classes": len(benchmark_class_names(spec.classes_file)),
            "found": False,
            "images": None,
            "path": str(Path(root) / spec.image_dir),
            "preparation": spec.preparation,
            "problem": None,
        }
        try:
            dataset = open_dataset(spec.name, root)
        except DatasetError as error:
            row["problem"] = str(error)
        else:
            row["found"] = True
            row["images"] = len(dataset)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- listing


def _list_or_fail(name: str, what: str, folder: Path, extensions: Iterable[str], hint: str) -> dict[str, Path]:
    """Files of ``folder`` by id; DatasetError (with the hint) when missing or empty."""
    if not folder.is_dir():
        raise DatasetError(f"{name}: {what} not found at {folder}; {hint}")
    files, _ = _list_files(folder, frozenset(e.lower() for e in extensions))
    if not files:
        wanted = "/".join(sorted(extensions))
        raise DatasetError(f"{name}: no {wanted} {what} in {folder}; {hint}")
    return files


def _list_custom(folder: Path, extensions: frozenset[str], what: str) -> dict[str, Path]:
    """Files of a user-given folder by id; ambiguous ids (``a.png`` + ``a.tif``) are errors."""
    if not folder.is_dir():
        raise DatasetError(f"{what} folder not found: {folder}")
    files, clash = _list_files(folder, extensions)
    if clash is not None:
        first, second = clash
        raise DatasetError(
            f"{first} and {second} have the same name apart from the extension; "
            f"keep one per {what[:-1]} in {folder}"
        )
    if not files:
        raise DatasetError(f"no {what} found in {folder} (extensions {', '.join(sorted(extensions))})")
    return files


def _list_files(folder: Path, extensions: frozenset[str]) -> tuple[dict[str, Path], tuple[Path, Path] | None]:
    """Recursive listing: id (relative POSIX path, no extension) -> file, plus the first
    pair of files sharing an id, if any. Hidden entries are skipped; nothing is opened."""
    found: dict[str, Path] = {}
    clash: tuple[Path, Path] | None = None
    pending = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            raise DatasetError(f"cannot list {directory}: {error.strerror or error}") from None
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                subdirs.append((Path(entry.path), f"{prefix}{entry.name}/"))
                continue
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in extensions:
                continue
            key = prefix + stem
            if key in found:
                clash = clash or (found[key], Path(entry.path))
                continue
            found[key] = Path(entry.path)
        pending.extend(reversed(subdirs))
    return found, clash


def _split_ids(spec: DatasetSpec, path: Path, hint: str) -> list[str]:
    """Ids of a split list (one per line, blanks skipped), in file order, de-duplicated."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{spec.name}: split list not found at {path}; {hint}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{spec.name}: cannot read split list {path}: {error}") from None
    ids = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not ids:
        raise DatasetError(f"{spec.name}: split list {path} is empty; {hint}")
    return ids
