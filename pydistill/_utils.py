"""Small helpers shared by the backends."""
from __future__ import annotations

import contextlib

import torch

# Tests set this to fill every buffer a kernel is meant to write with NaN first, so an
# element the kernel forgets to write cannot pass as a correct zero.
POISON_OUTPUTS = False


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def autocast_off(device: torch.device):
    """A context in which autocast is off for ``device``'s type: the losses compute in float32
    (float64 for float64 inputs) whatever autocast the caller runs under, and take their inputs
    in whatever dtype they arrive (they upcast internally, as without autocast). A no-op where
    autocast is off already, or where the device type has none (meta)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()
