"""Dtypes shared by the library's statistics (no Lightning import: the functional core uses it too)."""

from __future__ import annotations

import torch


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and running statistics, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
