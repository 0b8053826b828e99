"""The one place that knows the peers: what a user would run instead of pydistill, how to
build each on a family's case, and why one cannot run here.

Kinds of implementation (the ``peer`` column of the suite's CSV, ``--peer`` on its command
line):

=============  ==========================================================================
``pydistill``  pydistill's own backends (``backend="triton"``, ``"torch"``, ...)
``eager``      the naive PyTorch code, the way users write the loss (plain autograd)
``compile``    ``torch.compile`` of the eager code, static shapes, compiled per size
``liger``      Liger-Kernel (``liger-kernel`` on PyPI; Triton, CUDA only): LigerKLDIVLoss,
               LigerJSD, LigerTVDLoss, LigerFusedLinearJSD, LigerFusedLinearJSDLoss
``trl``        TRL (``trl`` on PyPI): ``GKDTrainer.generalized_jsd_loss`` (plain PyTorch,
               any device), GOLD's ``ULDLoss`` (``trl.experimental.gold``, plain PyTorch)
               and, from TRL 1.16, ``trl.kernels.chunked_divergence`` (Triton, CUDA only)
``sdpa``       a yardstick, not the same op: ``F.scaled_dot_product_attention`` forward +
               backward at the attention family's shapes (bench_attention_kd.py)
=============  ==========================================================================

A builder returns the loss function or a string ``"skipped: <reason>"``: an optional peer
that is not installed, cannot run on this device or has no equivalent of the case is a row
that says so, never a missing row. Conventions: every peer's loss is multiplied by T^2
where the peer leaves it out, so that all rows compute pydistill's loss (checked by the
rows' ``loss_rel_diff``); generalized-JSD ``beta`` is pydistill's (beta = 0 is kl, 1 is
reverse_kl), which Liger and TRL share.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from functools import lru_cache
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pydistill.bench import harness

KINDS = ("pydistill", "eager", "compile", "liger", "trl", "sdpa")


def peer_kind(impl) -> str:
    """The kind of an implementation: its ``peer`` field where it has one, else from its
    name (pydistill-*, *-compile, liger*, trl*, and eager for the rest)."""
    kind = getattr(impl, "peer", "")
    if kind:
        return kind
    name = getattr(impl, "name", impl)
    if name.startswith("pydistill"):
        return "pydistill"
    if name.endswith("compile"):
        return "compile"
    for prefix in ("liger", "trl"):
        if name.startswith(prefix):
            return prefix
    return "eager"


def package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """What each kind runs, for the report: {kind: 'name version' or 'not installed'}."""
    import pydistill

    def installed(dist):
        v = package_version(dist)
        return f"{dist} {v}" if v else f"{dist} not installed"

    return {
        "pydistill": f"pydistill {getattr(pydistill, '__version__', '?')}",
        "eager": f"torch {torch.__version__}",
        "compile": f"torch {torch.__version__}",
        "liger": installed("liger-kernel"),
        "trl": installed("trl"),
        "sdpa": f"torch {torch.__version__}",
    }


def impl_version(kind: str) -> str:
    return versions().get(kind, "") if kind else ""


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def compiled(fn):
    """``torch.compile`` of ``fn`` with a fresh cache: static shapes, the compiled peer's best
    case, and no recompile limit reached across sizes."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def eager_and_compiled(naive: Callable) -> tuple:
    """A family's ``eager`` and ``compile`` builders from ``naive(case)``, the loss as users
    write it (or why there is none, "skipped: ..."): that loss, and its ``compiled``."""

    def build_eager(case, device: torch.device):
        return naive(case)

    def build_compiled(case, device: torch.device):
        fn = naive(case)
        return fn if isinstance(fn, str) else compiled(fn)

    return build_eager, build_compiled


# --------------------------------------------------------------------------------------
# Liger-Kernel
# --------------------------------------------------------------------------------------


def liger_unavailable(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger-kernel not installed (optional: pip install liger-kernel)"
    if device.type != "cuda":
        return "skipped: Liger-Kernel runs on CUDA only"
    return None


def liger_softmax(case, device: torch.device):
    """kd_loss's Liger peer: LigerKLDIVLoss (kl), LigerJSD (jsd; reverse_kl as beta = 1),
    LigerTVDLoss (tvd), each after the log_softmax / softmax of s / T and t / T it needs."""
    reason = liger_unavailable(device)
    if reason:
        return reason
    if case.divergence.startswith("skew"):
        return f"skipped: Liger-Kernel has no {case.divergence}"
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except Exception as exc:  # a broken install is a finding, not a crash
        return f"skipped: liger-kernel does not import ({harness.one_line(exc)})"

    temperature, t2 = case.temperature, case.temperature * case.temperature
    if case.divergence == "tvd":
        # LigerTVDLoss takes probabilities (student first) and returns the gradient of the first.
        tvd = LigerTVDLoss(reduction="batchmean")

        def liger_tvd(student_logits, teacher_logits):
            q = torch.softmax(student_logits / temperature, dim=-1)
            p = torch.softmax(teacher_logits / temperature, dim=-1)
            return tvd(q, p) * t2

        return liger_tvd
    if case.divergence == "kl":
        # nn.KLDivLoss convention: (student log-probs, teacher log-probs with log_target).
        loss_fn = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        # LigerJSD(log_q, log_p): student first; beta = 1 is reverse KL.
        loss_fn = LigerJSD(beta=1.0 if case.divergence == "reverse_kl" else case.beta)

    def liger_loss(student_logits, teacher_logits):
        log_q = F.log_softmax(student_logits / temperature, dim=-1)
        log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
        return loss_fn(log_q, log_p) * t2

    return liger_loss


def generalized_jsd_beta(case) -> Optional[float]:
    """The generalized-JSD beta of a divergence (kl 0, reverse_kl 1, jsd its beta), or None
    when the generalized JSD has no equivalent."""
    return {"kl": 0.0, "reverse_kl": 1.0, "jsd": case.beta}.get(case.divergence)


def liger_fused_linear_jsd(case, device: torch.device):
    """linear_kd_loss's Liger peer: LigerFusedLinearJSD, times T^2."""
    reason = liger_unavailable(device)
    if reason:
        return reason
    beta = generalized_jsd_beta(case)
    if beta is None:
        return f"skipped: Liger-Kernel's fused linear JSD has no {case.divergence}"
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:
        return f"skipped: liger-kernel does not import ({harness.one_line(exc)})"

    jsd = LigerFusedLinearJSD(jsd_beta=beta, temperature=case.temperature)
    t2 = case.temperature**2  # Liger's loss has no T^2 factor
    return lambda h_s, w_s, h_t, w_t: jsd(h_s, w_s, h_t, w_t, None) * t2


def liger_chunked_jsd(case, device: torch.device):
    """linear_kd_loss's other Liger peer: LigerFusedLinearJSDLoss (chunked_loss, hard weight
    0, compiled), times T^2."""
    reason = liger_unavailable(device)
    if reason:
        return reason
    beta = generalized_jsd_beta(case)
    if beta is None:
        return f"skipped: Liger-Kernel's chunked JSD has no {case.divergence}"
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:
        return f"skipped: liger-kernel does not import ({harness.one_line(exc)})"

    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                  temperature=case.temperature)
    labels = torch.zeros(case.n, dtype=torch.long, device=device)  # masks nothing
    t2 = case.temperature**2
    return lambda h_s, w_s, h_t, w_t: jsd(h_s, w_s, h_t, w_t, labels) * t2


# --------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------

# Where GKDTrainer has lived: trl.experimental.gkd in recent TRL, trl.trainer before.
_GKD_MODULES = ("trl.experimental.gkd.gkd_trainer", "trl.experimental.gkd", "trl.trainer.gkd_trainer",
                "trl")


def trl_unavailable() -> Optional[str]:
    if importlib.util.find_spec("trl") is None:
        return "skipped: trl not installed (optional: pip install trl)"
    return None


@lru_cache(maxsize=None)
def _trl_generalized_jsd():
    """TRL's ``generalized_jsd_loss`` (a static method of GKDTrainer), or why it cannot be
    had (a string)."""
    errors = []
    for name in _GKD_MODULES:
        try:
            with warnings.catch_warnings():  # trl.experimental warns that it is experimental
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception as exc:  # TRL imports transformers, datasets, ...: any may fail
            errors.append(f"{name}: {harness.one_line(exc)}")
            continue
        trainer = getattr(module, "GKDTrainer", None)
        fn = getattr(trainer, "generalized_jsd_loss", None)
        if fn is not None:
            return fn
    detail = "; ".join(errors[-1:]) or "no GKDTrainer.generalized_jsd_loss"
    return f"skipped: trl {package_version('trl')} has no importable generalized_jsd_loss ({detail})"


def preload() -> None:
    """Import the installed peers now (TRL brings transformers and more), so that the first
    case does not pay for it and the objects they create can be frozen out of the garbage
    collector's work (harness.PeakMemory collects before every measurement)."""
    if trl_unavailable() is None:
        _trl_generalized_jsd()
        _trl_gold_uld()
    if importlib.util.find_spec("liger_kernel") is not None:
        try:
            importlib.import_module("liger_kernel.transformers")
        except Exception:  # reported by the builders, row by row
            pass


def trl_softmax(case, device: torch.device):
    """kd_loss's TRL peer: ``GKDTrainer.generalized_jsd_loss(student, teacher, beta=,
    temperature=, reduction="batchmean")`` (kl as beta = 0, reverse_kl as beta = 1), times
    T^2 (TRL leaves it out)."""
    reason = trl_unavailable()
    if reason:
        return reason
    beta = generalized_jsd_beta(case)
    if beta is None:
        return f"skipped: TRL's generalized JSD has no {case.divergence}"
    fn = _trl_generalized_jsd()
    if isinstance(fn, str):
        return fn
    temperature, t2 = case.temperature, case.temperature**2
    return lambda student_logits, teacher_logits: fn(
        student_logits, teacher_logits, beta=beta, temperature=temperature,
        reduction="batchmean") * t2


@lru_cache(maxsize=None)
def _trl_gold_uld():
    """TRL GOLD's ``ULDLoss`` class, or why it cannot be had (a string)."""
    # trl.experimental warns on import unless this is set: noise in a benchmark's log.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gold.gold_trainer import ULDLoss
    except Exception as exc:  # TRL imports transformers, datasets, ...: any may fail
        return (f"skipped: trl {package_version('trl')} has no importable "
                f"trl.experimental.gold ULDLoss ({harness.one_line(exc)})")
    return ULDLoss


def trl_uld(case, device: torch.device):
    """uld_loss's TRL peer: GOLD's ``ULDLoss`` (distillation term only, both temperatures T,
    positional alignment) on the rows as one sequence of ``case.n`` positions, whose
    per-sequence mean is pydistill's ``mean``. GOLD sorts the whole vocabulary: no ``top_k``."""
    reason = trl_unavailable()
    if reason:
        return reason
    if case.top_k is not None:
        return "skipped: TRL GOLD's ULDLoss sorts the whole vocabulary (no top_k)"
    uld = _trl_gold_uld()
    if isinstance(uld, str):
        return uld
    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
        uld_student_temperature=case.temperature, uld_teacher_temperature=case.temperature,
        uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=False,
        uld_token_merge_strategy="observed", uld_use_hybrid_loss=False)
    loss_fn = uld(config)
    # Every position is an answer token (no -100): all rows aligned and counted. Without
    # use_extended_uld the input ids only give the aligned length, their values are unused.
    labels = torch.zeros(1, case.n, dtype=torch.long, device=device)

    def gold_uld(student_logits, teacher_logits):
        return loss_fn(student_logits.unsqueeze(0), teacher_logits.unsqueeze(0),
                       labels, labels, labels, labels)

    return gold_uld


def trl_chunked_divergence(case, device: torch.device):
    """linear_kd_loss's TRL peer (TRL >= 1.16): ``ChunkedDivergenceFunction`` of
    trl/kernels/chunked_divergence.py, the per-token divergence from both hidden states and
    heads without materialising the logits (with the case's per-model logit scales and
    soft-caps, if any); its mean over tokens, times T^2."""
    reason = trl_unavailable()
    if reason:
        return reason
    if device.type != "cuda":
        return "skipped: TRL's chunked divergence is a Triton kernel (CUDA only)"
    beta = generalized_jsd_beta(case)
    if beta is None:
        return f"skipped: TRL's chunked divergence has no {case.divergence}"
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except Exception as exc:
        return (f"skipped: trl {package_version('trl')} has no importable "
                f"trl.kernels.chunked_divergence (TRL >= 1.16; {harness.one_line(exc)})")
    temperature, t2 = case.temperature, case.temperature**2
    # per-model logit transforms (bench_linear_kd's TRANSFORMS), in TRL's argument order
    t = getattr(case, "transforms", None) or {}
    transforms = (t.get("student_logit_scale", 1.0), t.get("student_softcap"),
                  t.get("teacher_logit_scale", 1.0), t.get("teacher_softcap"))

    def trl_loss(h_s, w_s, h_t, w_t):
        divergence, _entropy = ChunkedDivergenceFunction.apply(
            h_s, w_s, None, h_t, w_t, None, beta, temperature, *transforms)
        return divergence.mean() * t2

    return trl_loss
