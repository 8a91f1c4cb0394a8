"""The backend interface and registry.

A backend runs an engine's phases on arrays of its own kind (numpy for ONNX Runtime on CPU, torch tensors
for the torch reference, device buffers for TensorRT); arrays stay in that kind between phases and only
logits and kept indices come back as numpy. Register a new one with `register_backend(name, "module:Class")`
(imported on first use) or with the class itself.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from leanvlm.errors import UserError
from leanvlm.spec.engine import EngineSpec

KV = tuple[Any, Any]  # (key, value) of one layer: [B, kv_heads, length, head_dim]


class Backend(ABC):
    """One engine, opened for running. `options` names the keyword options the constructor takes; anything
    else given to `make_backend` is refused."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: EngineSpec):
        self.spec = spec

    @abstractmethod
    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A zeroed array of this backend's kind (KV-cache buffers)."""

    @abstractmethod
    def empty_features(self, batch: int) -> Any:
        """Image features with zero tokens, for decode steps through the embed graph."""

    @abstractmethod
    def vision(self, pixel_values) -> tuple[Any, list, list]:
        """pixel_values -> (image_features, kept indices per vision stage, merge targets per merging stage)."""

    @abstractmethod
    def embed(self, input_ids, image_features) -> Any:
        """Token embeddings with the image features spliced in at the `<image>` positions."""

    @abstractmethod
    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start) -> tuple[Any, list[KV], list, list]:
        """-> (last-token logits as numpy [B, V], per-layer present KV, kept indices and merge targets per
        LLM stage as numpy)."""

    @abstractmethod
    def decode(self, inputs_embeds, position_ids, masks: list, past: list[KV]) -> tuple[Any, list[KV]]:
        """One step: -> (logits as numpy [B, V], each layer's new KV entry [B, kv_heads, 1, head_dim]).

        `past` are the cache buffers themselves (unfilled slots masked); a backend may keep them bound between
        calls and read them in place, so write new entries into them rather than replacing them. The returned
        arrays may be buffers the backend reuses: consume them before the next decode call on the thread."""

    def synchronize(self) -> None:
        """Wait for queued device work (timings); a no-op on synchronous backends."""

    def close(self) -> None:
        """Release sessions and device memory; the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_REGISTRY: dict[str, str | type[Backend]] = {
    "onnxruntime": "leanvlm.runtime.backends.onnxruntime:OrtBackend",
    "torch": "leanvlm.runtime.backends.torch:TorchBackend",
    "tensorrt": "leanvlm.runtime.backends.tensorrt:TensorRTBackend",
}
# Modules a backend needs beyond leanvlm's own dependencies (its class still imports without them and refuses
# to open an engine with a message saying how to install them).
_REQUIRES: dict[str, tuple[str, ...]] = {"tensorrt": ("tensorrt",)}


def register_backend(name: str, target: str | type[Backend], requires: tuple[str, ...] = ()) -> None:
    """Add a backend under `name`: a Backend subclass or its "module:Class" path (imported when first used);
    `requires`: modules it needs that may be absent (see backend_available)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a backend needs a non-empty name")
    _REGISTRY[name] = target
    _REQUIRES[name] = tuple(requires)


def backend_available(name: str) -> bool:
    """Whether the modules `name` needs are installed here (not whether a GPU is present)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in _REQUIRES.get(name, ()))


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The class registered under `name` (importing its module now), or a UserError naming the choices."""
    target = _REGISTRY.get(name) if isinstance(name, str) else None
    if target is None:
        raise UserError(f"backend {name!r}: choose one of {', '.join(_REGISTRY)}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = target
    return target


def make_backend(spec: EngineSpec, name: str, **options) -> Backend:
    """Open `spec` with the backend registered as `name`; unknown options are refused, not ignored."""
    cls = backend_class(name)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        known = ", ".join(cls.options) or "none"
        raise UserError(f"backend {name!r}: unknown option(s) {', '.join(unknown)}; it takes: {known}")
    return cls(spec, **options)
