"""Backends run the four phases (vision, embed, prefill, decode) of an engine. `base` holds the interface and
the registry; each implementation lives in its own module and is imported only when asked for, so running
ONNX Runtime engines never imports torch."""

from leanvlm.runtime.backends.base import (Backend, backend_available, backend_class, backend_names, make_backend,
                                           register_backend)

__all__ = ["Backend", "backend_available", "backend_class", "backend_names", "make_backend", "register_backend"]
