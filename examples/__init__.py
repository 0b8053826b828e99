"""End-to-end distillation runs on pydistill: ``python -m pydistill.examples.<name>``."""
