"""Writing benchmark results: one Markdown section per benchmark in benchmarks/RESULTS.md."""
from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path


def machine_description() -> str:
    """CPU model, core count, memory and OS, read from /proc where available."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}{_vector_units()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def bf16_caveat() -> str:
    """A sentence for bf16 rows measured on a CPU that only emulates bf16 (else empty)."""
    if _native_bf16() is not False:
        return ""
    return ("This CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 is emulated here, several times slower "
            "than fp32, so its times say nothing of a CPU with native bf16; its agreement figures still hold.")


def _native_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (ovss_cli's check); None without torch or ovss_cli."""
    try:
        from ovss_cli.runtime import cpu_has_native_bf16
    except ImportError:
        return None
    return cpu_has_native_bf16()


def _vector_units() -> str:
    """The widest vector instructions PyTorch uses here, and whether bf16 is native (bf16
    timings differ several-fold between CPUs with and without it)."""
    native = _native_bf16()
    if native is None:
        return ""
    import torch

    bf16 = "native bf16" if native else "no native bf16 (emulated: slower than fp32)"
    return f" ({torch.backends.cpu.get_cpu_capability()}, {bf16})"


def write_section(path: Path, title: str, machine: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of ``path``."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in this folder; each section says how it was measured.\n"
    stamp = dt.date.today().isoformat()
    section = f"## {title}\n\nMeasured {stamp} on: {machine}.\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
