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


class _Float32Backward(torch.autograd.Function):
    """``fn(*inputs)`` recorded by plain autograd in the forward; the backward differentiates
    that graph with autocast off (see ``float32_backward``)."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        leaves = [x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.requires_grad else x
                  for x in inputs]
        with torch.enable_grad():
            out = fn(*leaves)
        ctx.leaves, ctx.out = leaves, out
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        wanted = [x for x in ctx.leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        with autocast_off(grad.device):
            # retain_graph: the outer graph may be run again (retain_graph=True); this one is
            # freed with it
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad, retain_graph=True, allow_unused=True))
        return (None, *[next(grads) if isinstance(x, torch.Tensor) and x.requires_grad else None
                        for x in ctx.leaves])


def float32_backward(fn, *inputs):
    """``fn(*inputs)`` (a computation by plain autograd, run by the caller with autocast off)
    whose backward also runs with autocast off: a ``backward()`` called inside a
    ``torch.autocast`` region would otherwise run the recorded matmuls' backward in the
    autocast dtype. First-order only (a second derivative raises). Without a gradient to
    compute it is ``fn(*inputs)`` itself."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        return fn(*inputs)
    return _Float32Backward.apply(fn, *inputs)
