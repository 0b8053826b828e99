"""Drop-ins for training frameworks.

- :func:`generalized_jsd_loss`: TRL's GKD loss (same signature and value) on pydistill's
  kernels; :func:`linear_generalized_jsd_loss`: the same from hidden states and LM heads.
- :func:`trl_chunked_divergence_loss`: TRL's ``DistillationTrainer`` loss
  (``trl.trainer.distillation_trainer._chunked_divergence_loss``: same signature and return
  value) on :func:`pydistill.linear_kd_loss`.
- :class:`DistillationTrainer` / :func:`causal_lm_kd_loss`: a Hugging Face ``Trainer`` that
  distils a teacher into a causal LM through :func:`pydistill.linear_kd_loss` (no logits).
- :func:`patch_trl`: both patches at once, after :func:`check_trl_version` (the drop-ins
  check it too: TRL :data:`TRL_VERSIONS`, the releases whose private names they replace).
- :func:`call_in_forward`: run a fused loss as a wrapped model's forward (DDP, FSDP2,
  accelerate's mixed precision), for hand-written training loops; :func:`gather_head_parameter`:
  an FSDP2-sharded head weight gathered with its gradient averaged back.

``import pydistill.integrations`` needs neither ``transformers`` nor ``trl``: the Trainer
integration imports ``transformers`` when one of its names is first used.
"""
from pydistill.integrations.distributed import call_in_forward, gather_head_parameter, unwrap_model
from pydistill.integrations.gkd import generalized_jsd_loss, linear_generalized_jsd_loss
from pydistill.integrations.trl import (TRL_VERSIONS, check_trl_version, patch_trl,
                                       trl_chunked_divergence_loss)

__all__ = ["generalized_jsd_loss", "linear_generalized_jsd_loss", "trl_chunked_divergence_loss",
           "patch_trl", "check_trl_version", "TRL_VERSIONS",
           "call_in_forward", "gather_head_parameter", "unwrap_model",
           "DistillationTrainer", "causal_lm_kd_loss"]

_HF = ("DistillationTrainer", "causal_lm_kd_loss")


def __getattr__(name):
    if name in _HF:
        try:
            from pydistill.integrations import hf
        except ImportError as e:
            raise ImportError(f"pydistill.integrations.{name} needs transformers: "
                              f'pip install "pydistill-kernels[examples]" ({e})') from e
        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
