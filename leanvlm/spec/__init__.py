"""What an engine is, without torch: IO and node names, precisions, defaults, the manifest and the typed
engine spec parsed from it. Export writes these; engines, backends and the runtime read them."""

from leanvlm.spec.engine import CacheGroupSpec, EngineSpec, Limits, ModelDims
from leanvlm.spec.manifest import load_engine_spec
from leanvlm.spec.precision import PRECISIONS, Precision, get_precision

__all__ = ["CacheGroupSpec", "EngineSpec", "Limits", "ModelDims", "PRECISIONS", "Precision", "get_precision",
           "load_engine_spec"]
