"""genreflow.runtime: the one device choice every step makes, and the allocator setting."""

from __future__ import annotations

import pytest
import torch

from genreflow.errors import GenreflowError
from genreflow.runtime import freed_memory_kept, keep_freed_memory, resolve_device


def test_device_names_auto_cpu_cuda_and_cuda_n():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("tpu", "cuda:", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(GenreflowError, match="must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        count = torch.cuda.device_count()
        with pytest.raises(GenreflowError, match=f"torch sees {count} CUDA"):
            resolve_device(f"cuda:{count}")
    else:
        for name in ("cuda", "cuda:1"):
            with pytest.raises(GenreflowError, match="no CUDA device is available"):
                resolve_device(name)


def test_every_step_takes_the_same_device_names(tmp_path):
    # train (through inference's loaders too) and embed-features share the one function.
    from genreflow import embedding, inference, train

    assert train.resolve_device is inference.resolve_device is embedding.resolve_device
    assert train.resolve_device is resolve_device
    # One place decides the precision for the training step and the frozen base's embed.
    assert train.resolve_precision is embedding.resolve_precision
    assert train.autocast_for is embedding.autocast_for


def test_keeping_freed_memory_is_undone():
    restore = keep_freed_memory()
    restore()
    with freed_memory_kept():
        block = bytearray(64 << 20)  # above glibc's mmap threshold
        del block
