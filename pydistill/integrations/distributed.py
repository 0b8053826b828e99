"""Running a fused loss inside a wrapped model's forward (DDP, FSDP2, accelerate), for
hand-written training loops and for the Trainer integration.

A fused loss such as :func:`pydistill.linear_kd_loss` reads the model's LM-head weight itself
instead of calling the head. In a plain loop on ``ddp.module`` (or with the parameters of an
FSDP2 model read outside its forward) that goes wrong without an error: DistributedDataParallel
prepares its gradient reduction in its own forward (skipped: the gradients stay unsynchronised
across processes), FSDP2 gathers a module's parameters around that module's forward (skipped:
the sharded parameters are read), and accelerate's mixed precision is an autocast wrapped
around ``model.forward`` (skipped: the model runs in float32). :func:`call_in_forward` runs
the loss as the model's forward for one call, so every wrapper's hooks run around it::

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    def fused():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pdl.linear_kd_loss(hidden, model.lm_head.weight, teacher_hidden, teacher_weight,
                                  labels=shifted_labels)
    loss = call_in_forward(ddp, fused)  # not fused() on ddp.module
    loss.backward()                     # gradients all-reduced as after ddp(...)

This module imports neither ``transformers`` nor ``accelerate``.
"""
from __future__ import annotations

import types
from typing import Callable, Optional, TypeVar

import torch

__all__ = ["call_in_forward", "unwrap_model", "gather_head_parameter"]

R = TypeVar("R")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / DataParallel / ``torch.compile`` wrappers (an
    FSDP2 module is its own module: ``fully_shard`` wraps nothing)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _installed_autocast(module: torch.nn.Module) -> Optional[torch.autocast]:
    """The ``torch.autocast`` that a wrapper installed as ``module.forward`` enters around the
    class's forward, or None. accelerate's mixed precision (``Accelerator.prepare``) installs
    ``convert_outputs_to_fp32(autocast(type(module).forward))``; the autocast is found by
    following the wrappers' ``__wrapped__`` / ``model_forward`` / closure cells."""
    start = module.__dict__.get("forward")
    if start is None:
        return None
    seen, stack = set(), [start]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, torch.nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.autocast):
            return obj
        if isinstance(obj, types.MethodType):
            stack.append(obj.__func__)
            continue
        for name in ("__wrapped__", "model_forward"):
            stack.append(getattr(obj, name, None))
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(contents) or isinstance(contents, torch.autocast):
                stack.append(contents)
    if "_original_forward" in module.__dict__:
        # accelerate marks a model whose forward it wrapped for mixed precision; its autocast
        # was not found (another accelerate layout): accelerate's own context for this process
        from accelerate.utils import get_mixed_precision_context_manager

        ctx = get_mixed_precision_context_manager(native_amp=True)
        return ctx if isinstance(ctx, torch.autocast) else None
    return None


def call_in_forward(model: torch.nn.Module, fn: Callable[[], R]) -> R:
    """``fn()``, run as the forward of ``model`` for this one call: ``model()`` is called with
    the innermost module's ``forward`` replaced by ``fn`` (and put back before ``fn`` runs), so
    every wrapper acts around ``fn`` exactly as around an ordinary forward:

    - DistributedDataParallel prepares its gradient reduction (the gradients of ``fn``'s result
      are all-reduced in ``backward()``, averaged over the processes, as after ``ddp(x)``);
    - FSDP2 (``fully_shard``) gathers the root module's parameters before ``fn`` and registers
      its backward hooks on ``fn``'s result; parameters of submodules with their own
      ``fully_shard`` stay sharded unless their own forward runs (see
      :func:`gather_head_parameter`);
    - accelerate's mixed precision (``TrainingArguments(bf16=True / fp16=True)``,
      ``Accelerator(mixed_precision=...)``) runs ``fn`` under the autocast it wrapped around
      ``model.forward`` (this replaces that wrapped forward, so its autocast is entered here);
    - ``torch.compile(model)``: ``fn`` runs eagerly inside the compiled module's call.

    Args:
        model: the module as the training loop holds it: a DistributedDataParallel /
            DataParallel / ``torch.compile`` wrapper, an FSDP2 module, an accelerate-prepared
            model, a PEFT model (its forward is called; the base model's forward is replaced),
            or a plain module.
        fn: a function of no arguments, typically the backbone's forward and a fused loss on
            ``unwrap_model(model)``'s parameters.

    Returns:
        ``fn()``'s result (the wrappers may post-process a model's outputs: accelerate converts
        half-precision floating outputs to float32).
    """
    outer = unwrap_model(model)
    module = outer.get_base_model() if _is_peft_model(outer) else outer
    # accelerate wraps the forward of the model it was given: the PEFT model, or the module
    autocast = _installed_autocast(module) if module is outer else None
    had_own = "forward" in module.__dict__
    original = module.__dict__.get("forward")

    def restore():
        if had_own:
            module.forward = original
        elif "forward" in module.__dict__:
            del module.forward

    def forward(*_args, **_kwargs):
        restore()
        if autocast is None:
            return fn()
        with autocast:
            return fn()

    module.forward = forward
    try:
        return model()
    finally:
        restore()


def _is_peft_model(model) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model")


def _is_dtensor(x) -> bool:
    if x is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def gather_head_parameter(param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter as one plain tensor: itself, or, for a sharded DTensor (FSDP2 parameters
    read outside their module's forward, e.g. an LM head given its own ``fully_shard``), its
    all-gather. The gradient of the gathered tensor goes back as ``Partial("avg")``: each
    process's gradient is its own batch's, so the sharded parameter receives their average
    (reduce-scattered), which is how FSDP2 reduces every other gradient. A plain
    ``full_tensor()`` would treat the gradient as replicated and keep each process's own shard
    of its own gradient, unsynchronised."""
    if not _is_dtensor(param):
        return param
    if not param.requires_grad or not torch.is_grad_enabled():
        return param.full_tensor()
    from torch.distributed.tensor import Partial

    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
