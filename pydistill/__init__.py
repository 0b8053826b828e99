"""pydistill: fused kernels for knowledge-distillation losses.

    import pydistill as pdl
    loss = pdl.kd_loss(student_logits, teacher_logits, temperature=2.0)

Importing needs neither a GPU, nor Triton, nor a compiled extension: kernels are imported
when a backend that needs them is first used.
"""
from pydistill._version import __version__
from pydistill.functional import kd_loss, linear_kd_loss, topk_kd_loss
from pydistill.modules import KDLoss, LinearKDLoss, TopKKDLoss
from pydistill.functional import attention_transfer_loss, hint_loss, rkd_loss
from pydistill.modules import AttentionTransferLoss, HintLoss, RKDLoss
from pydistill.functional import attention_kd_loss, relation_kd_loss
from pydistill.modules import AttentionKDLoss, RelationKDLoss
from pydistill.functional import linear_uld_loss, uld_loss
from pydistill.functional import linear_offline_kd_loss, offline_kd_loss, sampled_kd_loss
from pydistill.modules import LinearULDLoss, ULDLoss
from pydistill import alignment
from pydistill.objective import DistillationObjective
from pydistill.reference.softmax_divergence import DIVERGENCES, REDUCTIONS
from pydistill.reference.topk_divergence import TAILS
from pydistill._dispatch import BACKENDS, resolve_backend

__all__ = ["__version__", "kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "DIVERGENCES", "REDUCTIONS", "BACKENDS",
           "resolve_backend", "topk_kd_loss", "TopKKDLoss", "TAILS", "DistillationObjective",
           "attention_transfer_loss", "AttentionTransferLoss", "hint_loss", "HintLoss", "rkd_loss",
           "RKDLoss", "attention_kd_loss", "AttentionKDLoss", "relation_kd_loss", "RelationKDLoss",
           "uld_loss", "ULDLoss", "linear_uld_loss", "LinearULDLoss", "alignment",
           "sampled_kd_loss", "offline_kd_loss", "linear_offline_kd_loss"]
