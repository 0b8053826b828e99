"""Drop-ins for training frameworks.

- :func:`generalized_jsd_loss`: TRL's GKD loss (same signature and value) on pydistill's
  kernels; :func:`linear_generalized_jsd_loss`: the same from hidden states and LM heads.
- :class:`DistillationTrainer` / :func:`causal_lm_kd_loss`: a Hugging Face ``Trainer`` that
  distils a teacher into a causal LM through :func:`pydistill.linear_kd_loss` (no logits).

``import pydistill.integrations`` needs neither ``transformers`` nor ``trl``: the Trainer
integration imports ``transformers`` when one of its names is first used.
"""
from pydistill.integrations.gkd import generalized_jsd_loss, linear_generalized_jsd_loss

__all__ = ["generalized_jsd_loss", "linear_generalized_jsd_loss", "DistillationTrainer",
           "causal_lm_kd_loss"]

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
