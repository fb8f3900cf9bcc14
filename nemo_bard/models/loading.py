"""Choosing where and in which precision a model runs for inference (one rule for every entry point)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device_dtype(device: str | torch.device | None = None,
                         dtype: str | torch.dtype | None = "auto") -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)``: CUDA when available unless ``device`` says otherwise; ``auto`` = bf16 on CUDA, fp32 on CPU.

    Raises ``ValueError`` (naming ``--device`` / ``--dtype``) for a CUDA device on a host without one or an unknown dtype.
    """
    # torch: ~3.5 s; front ends call this to check --device/--dtype before loading a model
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    name = dtype or "auto"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name == "auto":
        name = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, name)
