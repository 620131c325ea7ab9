"""What a bug report needs: the versions of ovss, Python, torch (and CUDA) and the model libraries.

Package versions come from installed metadata, so nothing heavy is imported except torch,
which is asked whether CUDA works (the answer a GPU bug report hinges on).
"""
from __future__ import annotations

import platform
import sys
from importlib import metadata

# (label, distribution name) of the libraries whose versions change results or behaviour.
_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("torchvision", "torchvision"),
    ("open_clip", "open_clip_torch"),
    ("segment_anything", "segment-anything"),
    ("huggingface_hub", "huggingface_hub"),
    ("timm", "timm"),
    ("numpy", "numpy"),
    ("opencv", "opencv-python"),
    ("typer", "typer"),
)


def package_version(distribution: str) -> str:
    """Installed version of ``distribution``, or ``"not installed"``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def ovss_version() -> str:
    """The installed ``ovss-cli`` version (the package's own ``__version__`` in a source tree)."""
    try:
        return metadata.version("ovss-cli")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def torch_summary() -> str:
    """``2.4.0 (CUDA 12.1, 2 GPUs: NVIDIA H100 80GB HBM3)``, or why CUDA is not used."""
    try:
        import torch
    except ImportError:
        return "not installed"
    built = torch.version.cuda
    if not built:
        cuda = "CPU-only build"
    elif not torch.cuda.is_available():
        cuda = f"built for CUDA {built}, no GPU available"
    else:
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        cudnn = torch.backends.cudnn.version()
        cuda = f"CUDA {built}" + (f", cuDNN {cudnn}" if cudnn else "") + \
            f", {count} GPU{'s' if count != 1 else ''}: {', '.join(names)}"
    return f"{torch.__version__} ({cuda})"


def version_report() -> str:
    """One ``name version`` line per component, ready to paste into an issue."""
    lines = [
        f"ovss {ovss_version()}",
        f"python {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        f"torch {torch_summary()}",
    ]
    lines += [f"{label} {package_version(dist)}" for label, dist in _LIBRARIES]
    if sys.executable:
        lines.append(f"executable {sys.executable}")
    return "\n".join(lines)
