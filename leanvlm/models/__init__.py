"""Loading LLaVA checkpoints (aliases, hub ids, local dirs) and making tiny ones."""

from leanvlm.models.loading import MODEL_ALIASES, LoadedModel, load_model, resolve_model
from leanvlm.models.tiny import make_tiny

__all__ = ["MODEL_ALIASES", "LoadedModel", "load_model", "resolve_model", "make_tiny"]
