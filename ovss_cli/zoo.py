"""The model zoo: every checkpoint ``ovss`` knows how to fetch, as plain data.

Each :class:`ZooEntry` names one published file and where it lives: a file in a
Hugging Face Hub repository (:class:`HubFile`, fetched through ``huggingface_hub`` so its
cache, mirrors and tokens apply) or a plain URL (:class:`UrlFile`, fetched by our own
downloader). ``size`` (bytes) and ``sha256`` are filled in only where a public source
pins them; the comment above each entry says where. ``None`` means "not established",
never a guess: :mod:`ovss_cli.weights` then skips that check. Download, cache and
loading logic lives in :mod:`ovss_cli.weights`; this module holds data and look-ups only.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import UsageError, WeightsError

KINDS: tuple[str, ...] = ("san", "sam", "alpha-clip", "clip")

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubFile:
    """A file in a Hugging Face Hub model repository.

    ``revision`` is a branch or a commit hash (a commit pins the exact file the zoo's
    sha256 describes). ``alternates`` are other files of the same repository holding the
    same weights in another format (open_clip's older ``open_clip_pytorch_model.bin``):
    they are used when already in the Hugging Face cache, never downloaded.
    """

    repo_id: str
    filename: str
    revision: str = "main"
    alternates: tuple[str, ...] = ()

    def url(self, endpoint: str = HF_DEFAULT_ENDPOINT) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class UrlFile:
    """A file at a plain HTTP(S) URL (no Hugging Face semantics)."""

    address: str

    @property
    def filename(self) -> str:
        return self.address.rsplit("/", 1)[-1]

    def url(self, endpoint: str = HF_DEFAULT_ENDPOINT) -> str:  # noqa: ARG002 - same call as HubFile
        return self.address


@dataclass(frozen=True)
class ZooEntry:
    """One downloadable checkpoint.

    ``source`` says where the file lives; ``arch`` is the architecture name the matching
    model builder expects (``vit_b`` for SAM, ``ViT-B-16`` for CLIP/Alpha-CLIP,
    ``san-vit-b16`` for SAN).
    """

    name: str
    kind: str
    source: HubFile | UrlFile
    size: int | None
    sha256: str | None
    description: str
    arch: str
    homepage: str = ""

    @property
    def filename(self) -> str:
        return self.source.filename

    @property
    def url(self) -> str:
        """The canonical download URL (huggingface.co for Hub files)."""
        return self.source.url()


def _hf(repo_id: str, filename: str, revision: str = "main", alternates: tuple[str, ...] = ()) -> HubFile:
    return HubFile(repo_id, filename, revision, alternates)


_SAN_REPO = "Mendel192/san"
# open_clip's file names on the Hub: it fetches the safetensors file first, the pickle
# (same weights, older open_clip releases) otherwise.
_OPEN_CLIP_FILE = "open_clip_model.safetensors"
_OPEN_CLIP_BIN = "open_clip_pytorch_model.bin"


def _open_clip_hub(repo_id: str, revision: str) -> HubFile:
    return _hf(repo_id, _OPEN_CLIP_FILE, revision, alternates=(_OPEN_CLIP_BIN,))


_SAM_DL = "https://dl.fbaipublicfiles.com/segment_anything/"
_ALPHA_CLIP_XLAB = "https://download.openxlab.org.cn/models/SunzeY/AlphaCLIP/weight/"
_ALPHA_CLIP_HOME = "https://github.com/SunzeY/AlphaCLIP/blob/main/model-zoo.md"

_ENTRIES: tuple[ZooEntry, ...] = (
    # ---------------------------------------------------------------- SAN
    # Files: MendelXu/SAN README "Pretrained Weights" table (Hugging Face Mendel192/san,
    # branch main; the sha256 pins the content whatever commit main points at).
    # size + sha256: the Git LFS pointer committed to huggingface.co/Mendel192/san,
    # commit 112fe8bb08fb0a0d9aefa563b7def88ce979f759 ("upload vit-base/16 model").
    ZooEntry(
        name="san-vit-b16",
        kind="san",
        source=_hf(_SAN_REPO, "san_vit_b_16.pth"),
        size=698_678_283,
        sha256="d616d2767b206d66b70a7742398c9b818beaf9742e134894449196af11bf19da",
        description="SAN with a CLIP ViT-B/16 backbone, trained on COCO-Stuff (config san_clip_vit_res4_coco)",
        arch="san-vit-b16",
        homepage="https://github.com/MendelXu/SAN",
    ),
    # size + sha256: Git LFS pointer in huggingface.co/Mendel192/san,
    # commit ffc7de2be5e365ef73008d2c5b835ccbc0e7b8e4 ("Add large model").
    ZooEntry(
        name="san-vit-l14",
        kind="san",
        source=_hf(_SAN_REPO, "san_vit_large_14.pth"),
        size=1_821_680_110,
        sha256="dd605f75f8ec66a107164b064c3ef217deae2848349dc52e6eab6f0b071bf12c",
        description="SAN with a CLIP ViT-L/14 backbone, trained on COCO-Stuff (config san_clip_vit_large_res4_coco)",
        arch="san-vit-l14",
        homepage="https://github.com/MendelXu/SAN",
    ),
    # ---------------------------------------------------------------- SAM
    # URLs: facebookresearch/segment-anything README "Model Checkpoints".
    # sha256: pinned identically by computational-cell-analytics/micro-sam
    # (micro_sam/util.py, _CHECKSUMS) and many other projects; the same values appear as
    # the Git LFS SHA256 of byte-identical copies on the Hugging Face hub.
    # sizes: pinned next to those same sha256 values by several public download
    # manifests (model-info JSON files and download scripts that store size + sha256).
    ZooEntry(
        name="sam-vit-b",
        kind="sam",
        source=UrlFile(_SAM_DL + "sam_vit_b_01ec64.pth"),
        size=375_042_383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        description="Segment Anything, ViT-B image encoder (smallest, fastest)",
        arch="vit_b",
        homepage="https://github.com/facebookresearch/segment-anything",
    ),
    ZooEntry(
        name="sam-vit-l",
        kind="sam",
        source=UrlFile(_SAM_DL + "sam_vit_l_0b3195.pth"),
        size=1_249_524_607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        description="Segment Anything, ViT-L image encoder",
        arch="vit_l",
        homepage="https://github.com/facebookresearch/segment-anything",
    ),
    ZooEntry(
        name="sam-vit-h",
        kind="sam",
        source=UrlFile(_SAM_DL + "sam_vit_h_4b8939.pth"),
        size=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        description="Segment Anything, ViT-H image encoder (largest, most accurate)",
        arch="vit_h",
        homepage="https://github.com/facebookresearch/segment-anything",
    ),
    # ---------------------------------------------------------- Alpha-CLIP
    # URLs: the "openxlab link" column of SunzeY/AlphaCLIP model-zoo.md (the authors
    # publish no Hugging Face model repo for these weights; their HF account only hosts
    # demo Spaces and the MaskImageNet dataset). Note the openxlab file names differ from
    # the Google Drive names in places (e.g. "grit+mim" for "grit1m+mim",
    # "clip_l14_336_grit_20m_4xe" for L/14@336 on GRIT-20M).
    # No public size or checksum found for any of these files: size/sha256 are None.
    ZooEntry(
        name="alpha-clip-b16-grit1m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_b16_grit1m_fultune_8xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-B/16 fine-tuned on GRIT-1M",
        arch="ViT-B-16",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-l14-grit1m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_l14_grit1m_fultune_8xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-L/14 fine-tuned on GRIT-1M",
        arch="ViT-L-14",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-l14-336-grit1m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_l14_336_grit1m_fultune_8xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-L/14@336px fine-tuned on GRIT-1M",
        arch="ViT-L-14-336",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-b16-grit20m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_b16_grit20m_fultune_2xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-B/16 fine-tuned on GRIT-20M",
        arch="ViT-B-16",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-l14-grit20m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_l14_grit20m_fultune_2xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-L/14 fine-tuned on GRIT-20M",
        arch="ViT-L-14",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-l14-336-grit20m",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_l14_336_grit_20m_4xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-L/14@336px fine-tuned on GRIT-20M",
        arch="ViT-L-14-336",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-b16-grit1m-mim",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_b16_grit+mim_fultune_4xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-B/16 fine-tuned on GRIT-1M + MaskImageNet",
        arch="ViT-B-16",
        homepage=_ALPHA_CLIP_HOME,
    ),
    ZooEntry(
        name="alpha-clip-l14-grit1m-mim",
        kind="alpha-clip",
        source=UrlFile(_ALPHA_CLIP_XLAB + "clip_l14_grit+mim_fultune_6xe.pth"),
        size=None,
        sha256=None,
        description="Alpha-CLIP visual encoder, CLIP ViT-L/14 fine-tuned on GRIT-1M + MaskImageNet",
        arch="ViT-L-14",
        homepage=_ALPHA_CLIP_HOME,
    ),
    # --------------------------------------------------------------- CLIP
    # The OpenAI CLIP weights Alpha-CLIP builds on, as the safetensors file open_clip
    # itself fetches for pretrained="openai": open_clip's pretrained.py points the
    # ViT-B-16 / ViT-L-14 / ViT-L-14-336 "openai" tags at hf_hub
    # timm/vit_{base_patch16_clip_224,large_patch14_clip_224,large_patch14_clip_336}.openai
    # and tries open_clip_model.safetensors before open_clip_pytorch_model.bin. Fetching
    # them through huggingface_hub shares the Hugging Face cache with open_clip, so a user
    # of open_clip already has them. Each is pinned to the revision whose file the sha256
    # below describes (a copy cached from another revision is found by its blob, which
    # the Hugging Face cache names by the file's sha256).
    # (OpenAI's own TorchScript archives remain available at
    # https://openaipublic.azureedge.net/clip/models/<sha256>/ViT-B-16.pt etc.; their
    # sha256 is the path component, e.g. 5806e77c... for ViT-B-16.pt; load_state_file can
    # read them too.)
    #
    # sha256 4b869929...: revision 977e3dd0; pinned for
    # timm/vit_base_patch16_clip_224.openai/open_clip_model.safetensors by several
    # projects (e.g. a FedProRef scripts/download_checkpoints.py); size 598,516,980 bytes
    # from a reproduction report quoting that same sha256.
    ZooEntry(
        name="clip-vit-b16-openai",
        kind="clip",
        source=_open_clip_hub("timm/vit_base_patch16_clip_224.openai", "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d"),
        size=598_516_980,
        sha256="4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f",
        description="OpenAI CLIP ViT-B/16 (image + text encoders), open_clip safetensors",
        arch="ViT-B-16",
        homepage="https://huggingface.co/timm/vit_base_patch16_clip_224.openai",
    ),
    # sha256 9ce2e8a8...: the Hugging Face cache blob name (= LFS sha256) that
    # snapshots/18d0535469bb561bf468d76c1d73aa35156c922b/open_clip_model.safetensors of
    # timm/vit_large_patch14_clip_224.openai points at, as listed in public cache
    # inventories and checkpoint pins. Exact byte size not found (about 1.7 GB).
    ZooEntry(
        name="clip-vit-l14-openai",
        kind="clip",
        source=_open_clip_hub("timm/vit_large_patch14_clip_224.openai", "18d0535469bb561bf468d76c1d73aa35156c922b"),
        size=None,
        sha256="9ce2e8a8ebfff3793d7d375ad6d3c35cb9aebf3de7ace0fc7308accab7cd207e",
        description="OpenAI CLIP ViT-L/14 (image + text encoders), open_clip safetensors",
        arch="ViT-L-14",
        homepage="https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
    ),
    # sha256 fbc415c3...: pinned as the blob of
    # timm/vit_large_patch14_clip_336.openai@81e38efc.../open_clip_model.safetensors by a
    # public offline-cache setup script. Exact byte size not found (about 1.7 GB).
    ZooEntry(
        name="clip-vit-l14-336-openai",
        kind="clip",
        source=_open_clip_hub("timm/vit_large_patch14_clip_336.openai", "81e38efc4637de5023b10e75a7f9bd1c6fa6b010"),
        size=None,
        sha256="fbc415c3d0d7b79faed8f5ccfb740c32b7c4f5ffe7283b851f89c6231c01a8e0",
        description="OpenAI CLIP ViT-L/14@336px (image + text encoders), open_clip safetensors",
        arch="ViT-L-14-336",
        homepage="https://huggingface.co/timm/vit_large_patch14_clip_336.openai",
    ),
)

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}

DEFAULT_SAN = "san-vit-b16"
DEFAULT_SAM = "sam-vit-b"
DEFAULT_ALPHA_CLIP = "alpha-clip-b16-grit1m-mim"

# Alpha-CLIP checkpoints hold the visual encoder only; the text encoder (and the rest
# of CLIP) comes from the OpenAI CLIP of the same architecture.
ALPHA_CLIP_BASE: dict[str, str] = {
    "alpha-clip-b16-grit1m": "clip-vit-b16-openai",
    "alpha-clip-l14-grit1m": "clip-vit-l14-openai",
    "alpha-clip-l14-336-grit1m": "clip-vit-l14-336-openai",
    "alpha-clip-b16-grit20m": "clip-vit-b16-openai",
    "alpha-clip-l14-grit20m": "clip-vit-l14-openai",
    "alpha-clip-l14-336-grit20m": "clip-vit-l14-336-openai",
    "alpha-clip-b16-grit1m-mim": "clip-vit-b16-openai",
    "alpha-clip-l14-grit1m-mim": "clip-vit-l14-openai",
}


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; an unknown name raises :class:`WeightsError`."""
    try:
        return ZOO[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(ZOO), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise WeightsError(
            f"unknown model {name!r}{hint}; known models: {', '.join(ZOO)}"
        ) from None


def entries(kind: str | None = None) -> list[ZooEntry]:
    """All entries, or those of one ``kind`` (one of :data:`KINDS`), in zoo order."""
    if kind is None:
        return list(ZOO.values())
    if kind not in KINDS:
        raise WeightsError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return [entry for entry in ZOO.values() if entry.kind == kind]


def clip_for_alpha_clip(name: str) -> ZooEntry:
    """The CLIP entry an Alpha-CLIP entry needs for its text encoder."""
    entry = get_entry(name)
    if entry.kind != "alpha-clip":
        raise WeightsError(f"{name} is not an Alpha-CLIP checkpoint (it is a {entry.kind} checkpoint)")
    return get_entry(ALPHA_CLIP_BASE[name])


# What each segmentation method loads: the kinds of checkpoint, and the entries a run
# with default options needs.
METHOD_KINDS: dict[str, tuple[str, ...]] = {"san": ("san",), "sam": ("sam", "alpha-clip", "clip")}
METHOD_DEFAULTS: dict[str, tuple[str, ...]] = {
    "san": (DEFAULT_SAN,),
    "sam": (DEFAULT_SAM, DEFAULT_ALPHA_CLIP, ALPHA_CLIP_BASE[DEFAULT_ALPHA_CLIP]),
}


def with_dependencies(entry: ZooEntry) -> list[ZooEntry]:
    """``entry`` and what it cannot run without (an Alpha-CLIP checkpoint needs its CLIP)."""
    if entry.kind == "alpha-clip":
        return [entry, get_entry(ALPHA_CLIP_BASE[entry.name])]
    return [entry]


def select_entries(names: list[str] | tuple[str, ...] = (), *, all_entries: bool = False,
                   method: str | None = None) -> list[ZooEntry]:
    """The entries ``ovss models download`` fetches, in zoo order, each once.

    ``names`` (with what each needs), or every entry with ``all_entries``; ``method``
    alone means the checkpoints that method uses by default, and with ``all_entries``
    every checkpoint of its kinds. A name that ``method`` does not use is an error.
    """
    if method is not None and method not in METHOD_KINDS:
        raise UsageError(f"unknown method {method!r}; use one of {', '.join(METHOD_KINDS)}")
    if names and all_entries:
        raise UsageError("give model names or --all, not both")
    kinds = METHOD_KINDS[method] if method else KINDS
    if names:
        chosen = [dep for name in names for dep in with_dependencies(get_entry(name))]
        for entry in chosen:
            if entry.kind not in kinds:
                raise UsageError(f"{entry.name} is a {entry.kind} checkpoint, which --method {method} does not use")
    elif all_entries:
        chosen = [entry for entry in ZOO.values() if entry.kind in kinds]
    elif method:
        chosen = [get_entry(name) for name in METHOD_DEFAULTS[method]]
    else:
        raise UsageError("name the models to download (see `ovss models`), or give --all or --method san|sam")
    wanted = {entry.name for entry in chosen}
    return [entry for entry in ZOO.values() if entry.name in wanted]
