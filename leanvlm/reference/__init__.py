"""The PyTorch model that runs a reduction schedule: the spec every exported graph is checked against."""

from leanvlm.reference.model import ReducedLlava

__all__ = ["ReducedLlava"]
