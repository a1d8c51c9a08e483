"""How a step uses the machine it runs on: device, precision, CPU threads, the allocator.

Every choice here changes how fast a step runs, never what it computes (except bf16
autocast, which is asked for by name and recorded in the fold's summary). torch is imported
where it is used: pack's decoding workers take the allocator setting without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from genreflow.errors import GenreflowError
from genreflow.recipe import PRECISIONS

if TYPE_CHECKING:
    import torch


# --- device ------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N -> a torch device; auto is CUDA when torch sees a GPU.

    cuda:N is accepted (a machine with several GPUs runs one step per card); a pod that
    KFP gives one GPU sees it as cuda, so the pipeline never needs N.

    Raises:
        GenreflowError: an unknown name, or CUDA asked for where torch sees none (or
            fewer cards than N + 1).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, number = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not number.isdigit())):
        raise GenreflowError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenreflowError(f"--device {name}: no CUDA device is available to torch here")
    if number and int(number) >= torch.cuda.device_count():
        raise GenreflowError(
            f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device(name)


# --- precision ---------------------------------------------------------------------------
# Measured on 2 cores (Transfer_Cnn14, 5 s clips, batch 8 with mixup; bench/README.md):
# bf16 autocast made the training step 1.6x faster on an EPYC with AVX512-BF16 but more
# than 10x slower on an AVX2-only EPYC, where oneDNN emulates bf16.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, Arm Features


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16, AMX-BF16 or Arm's BF16)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if getattr(torch.cpu, probe, lambda: False)():
            return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return not _CPU_BF16_FLAGS.isdisjoint(value.split())
    except OSError:
        pass
    return False


def _cuda_has_native_bf16() -> bool:
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation; bf16 came with Ampere
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(name: str, device: torch.device) -> str:
    """'bf16' or 'fp32': what --precision `name` computes in on `device`.

    auto is bf16 autocast where the hardware has bf16 arithmetic and fp32 elsewhere:
    emulated bf16 is slower than fp32, not faster. bf16 needs no loss scaling; the
    weights, the optimiser and the log-mel front end stay in fp32 either way.

    Raises:
        GenreflowError: an unknown name, or bf16 asked for on a GPU without bf16.
    """
    import torch

    if name not in PRECISIONS:
        raise GenreflowError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device.type == "cuda":
        native = _cuda_has_native_bf16()
        if name == "bf16" and not native:
            raise GenreflowError(
                f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 "
                "arithmetic; use --precision fp32 (or auto)"
            )
    else:
        native = cpu_has_native_bf16()
    if name == "auto":
        return "bf16" if native else "fp32"
    if name == "bf16" and not native:
        print(
            "--precision bf16 on a CPU without native bf16: emulated, slower than fp32",
            file=sys.stderr,
            flush=True,
        )
    return name


def autocast_for(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context that forward passes run in: bf16 autocast, or nothing."""
    import torch

    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# --- CPU threads -------------------------------------------------------------------------
def cpu_threads() -> int:
    """The cores this process may use: its CPU set, capped by a cgroup CPU quota (a pod's
    CPU limit), which torch's default of one thread per visible core does not see."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = None
    with contextlib.suppress(OSError, ValueError):
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        if limit != "max":
            quota = int(limit) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if limit > 0:
                quota = limit / period
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: left alone) within the block."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads_for_training() -> contextlib.AbstractContextManager:
    """torch's intra-op threads capped at cpu_threads() for the run, unless OMP_NUM_THREADS
    says otherwise: more threads than the quota allows only wait on each other."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > cpu_threads():
        return torch_threads(cpu_threads())
    return torch_threads(None)


def one_thread() -> contextlib.AbstractContextManager:
    """torch on one thread: for tiny matrices (a 2048 -> 10 head) on a busy machine, the
    thread pool's synchronisation costs 50x the work itself (measured here: 41 s versus
    0.65 s for 300 full-batch steps on 2 cores with other processes running)."""
    return torch_threads(1)


# --- the allocator -----------------------------------------------------------------------
# glibc's malloc serves every block above its mmap threshold (32 MB at most: most of Cnn14's
# activations; a decoded clip's buffers of 2.6 to 3.8 MB once the threshold has adapted)
# with a fresh mmap and unmaps it when freed, or trims the heap past its trim threshold, so
# each step (each clip) maps fresh pages that the kernel zeroes on the first touch: a tenth
# of a CPU training step and a third of a clip's decoding time here (bench/). With mmap and
# trimming off, freed memory stays in the heap and the next step reuses it; the price is
# that the process's peak stays mapped until it is restored.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def libc_function(name: str) -> Callable | None:
    """A function of the C library (glibc, musl), or None where there is none such;
    errno is kept for ctypes.get_errno."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None


def keep_freed_memory() -> Callable[[], None]:
    """Make glibc's malloc keep freed memory for reuse instead of unmapping it; returns
    the function that restores glibc's defaults and trims the heap (a short-lived worker
    process need not call it). Elsewhere than on glibc, nothing happens."""
    try:
        is_glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not Linux
        is_glibc = False
    mallopt = libc_function("mallopt") if is_glibc else None
    if mallopt is None:
        return lambda: None
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)

    def restore() -> None:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc_function("malloc_trim")(0)

    return restore


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Within it, glibc's malloc keeps freed memory for reuse (see keep_freed_memory)."""
    restore = keep_freed_memory()
    try:
        yield
    finally:
        restore()
