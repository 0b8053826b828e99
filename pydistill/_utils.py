"""Small helpers shared by the backends."""
from __future__ import annotations

import torch

# Tests set this to fill every buffer a kernel is meant to write with NaN first, so an
# element the kernel forgets to write cannot pass as a correct zero.
POISON_OUTPUTS = False


def empty(shape, *, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out
