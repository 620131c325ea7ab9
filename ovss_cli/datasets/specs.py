"""The benchmark datasets ``ovss evaluate`` knows, as data: where each lives on disk.

Layouts are those the SAN / detectron2 preparation scripts write under the dataset root
(``--data-root``, ``$DETECTRON2_DATASETS`` or ``./datasets``), read from MendelXu/SAN
``san/data/datasets/register_*.py`` and detectron2 ``detectron2/data/datasets/builtin.py``
(ADE20K-150). ``evaluate`` reads the validation splits; ``train-san`` the training splits of
the benchmarks whose preparation writes one (voc21, read from the VOC release as is, has none).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: its class list and where images and labels are under the root.

    Images and labels are paired by file path relative to their folders, without the
    extension (as detectron2's ``load_sem_seg`` pairs them). With ``split_file`` set, only
    the ids listed there (one per line) are used.
    """

    name: str
    title: str
    classes_file: str  # under ovss_cli/data/classes/
    image_dir: str
    label_dir: str
    image_ext: str
    label_ext: str
    ignore_label: int
    preparation: str  # one line: what produces this layout
    background_is_label0: bool = False
    split_file: str | None = None
    # the training split (``ovss train-san --dataset``), where the preparation writes one
    train_image_dir: str | None = None
    train_label_dir: str | None = None
    # the image folder holds every split's images (VOC2012/JPEGImages): a split is its labels,
    # and an image without one belongs to another split (detectron2's load_sem_seg pairs them so)
    labels_define_split: bool = False

    def folders(self, split: str = "val") -> tuple[str, str, str | None]:
        """(image folder, label folder, split list or None) of ``split`` ("val" or "train")."""
        if split == "val":
            return self.image_dir, self.label_dir, self.split_file
        if split == "train" and self.train_image_dir and self.train_label_dir:
            return self.train_image_dir, self.train_label_dir, None
        from ..errors import UsageError

        raise UsageError(f"dataset {self.name} has no {split!r} split here; "
                         f"datasets with a training split: {', '.join(n for n, s in DATASETS.items() if s.train_image_dir)}")


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ade150",
            title="ADE20K-150 (ADEChallengeData2016 validation)",
            classes_file="ade150.txt",
            image_dir="ADEChallengeData2016/images/validation",
            label_dir="ADEChallengeData2016/annotations_detectron2/validation",
            train_image_dir="ADEChallengeData2016/images/training",
            train_label_dir="ADEChallengeData2016/annotations_detectron2/training",
            image_ext=".jpg",
            label_ext=".png",
            ignore_label=255,
            preparation="python datasets/prepare_ade20k_sem_seg.py (MendelXu/SAN or facebookresearch/detectron2)",
        ),
        DatasetSpec(
            name="ade847",
            title="ADE20K-847 (ADE20K_2021_17_01 validation)",
            classes_file="ade847.txt",
            image_dir="ADE20K_2021_17_01/images_detectron2/validation",
            label_dir="ADE20K_2021_17_01/annotations_detectron2/validation",
            train_image_dir="ADE20K_2021_17_01/images_detectron2/training",
            train_label_dir="ADE20K_2021_17_01/annotations_detectron2/training",
            image_ext=".jpg",
            label_ext=".tif",  # 16-bit TIFF, trainIds 0..846
            ignore_label=65535,
            preparation="python datasets/prepare_ade20k_full_sem_seg.py (facebookresearch/MaskFormer)",
        ),
        DatasetSpec(
            name="pc59",
            title="Pascal Context-59 (val)",
            classes_file="pc59.txt",
            image_dir="pcontext/val/image",
            label_dir="pcontext/val/label",
            train_image_dir="pcontext/train/image",
            train_label_dir="pcontext/train/label",
            image_ext=".jpg",
            label_ext=".png",
            ignore_label=255,
            preparation="python datasets/prepare_pcontext_sem_seg_59cls.py (MendelXu/SAN)",
        ),
        DatasetSpec(
            name="pc459",
            title="Pascal Context-459 (val)",
            classes_file="pc459.txt",
            image_dir="pcontext_full/val/image",
            label_dir="pcontext_full/val/label",
            train_image_dir="pcontext_full/train/image",
            train_label_dir="pcontext_full/train/label",
            image_ext=".jpg",
            label_ext=".tif",  # 16-bit TIFF, 0..458
            ignore_label=65535,
            preparation="python datasets/prepare_pcontext_sem_seg_459cls.py (MendelXu/SAN)",
        ),
        DatasetSpec(
            name="voc20",
            title="Pascal VOC-20 (VOC2012 val, background ignored)",
            classes_file="voc20.txt",
            image_dir="VOC2012/JPEGImages",
            label_dir="VOC2012/annotations_detectron2/val",
            train_image_dir="VOC2012/JPEGImages",
            train_label_dir="VOC2012/annotations_detectron2/train",
            image_ext=".jpg",
            label_ext=".png",
            ignore_label=255,
            preparation="python datasets/prepare_voc_sem_seg.py (MendelXu/SAN)",
            labels_define_split=True,
        ),
        # SAN has no VOC preparation that keeps background (prepare_voc_sem_seg.py maps
        # 0 -> 255), so voc21 reads the official VOC2012 release as is: the palette PNGs of
        # SegmentationClass hold class indices (0 = background, 1..20, 255 = boundary /
        # ignore), read as indices, restricted to ImageSets/Segmentation/val.txt (1449 ids).
        DatasetSpec(
            name="voc21",
            title="Pascal VOC-21 (VOC2012 val, with background)",
            classes_file="voc21.txt",
            image_dir="VOC2012/JPEGImages",
            label_dir="VOC2012/SegmentationClass",
            image_ext=".jpg",
            label_ext=".png",
            ignore_label=255,
            preparation="the VOC2012 folder of VOCtrainval_11-May-2012.tar as it is (no conversion)",
            background_is_label0=True,
            split_file="VOC2012/ImageSets/Segmentation/val.txt",
        ),
        DatasetSpec(
            name="cocostuff171",
            title="COCO-Stuff-171 (val2017)",
            classes_file="cocostuff171.txt",
            image_dir="coco/val2017",
            label_dir="coco/stuffthingmaps_detectron2/val2017",
            train_image_dir="coco/train2017",
            train_label_dir="coco/stuffthingmaps_detectron2/train2017",
            image_ext=".jpg",
            label_ext=".png",
            ignore_label=255,
            preparation="python datasets/prepare_coco_stuff_164k_sem_seg.py (MendelXu/zsseg.baseline)",
        ),
    )
}
