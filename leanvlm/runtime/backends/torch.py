"""The `torch` backend: the PyTorch reference (`ReducedLlava`) of the spec's schedule, on CPU or CUDA, in
float32, float16 or bfloat16. Loaded from the source checkpoint the manifest names (checked against its
config hash), or given an already loaded model (in-memory Pipelines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanvlm.errors import EngineError, UserError
from leanvlm.runtime.backends.base import Backend
from leanvlm.spec.engine import EngineSpec

DTYPES = ("float32", "float16", "bfloat16")


class TorchBackend(Backend):
    name = "torch"
    options = ("device", "dtype", "model_path", "hf_model", "atp_modules")

    def __init__(self, spec: EngineSpec, device: str | None = None, dtype: str | None = None,
                 model_path: str | Path | None = None, hf_model=None, atp_modules: dict | None = None):
        """hf_model: an already loaded LlavaForConditionalGeneration to share (no load, no hash check); it is
        moved to `device` and cast to `dtype` when those are given. atp_modules: the ATP modules of adaptive
        stages by layer (default: those saved beside the checkpoint)."""
        import torch

        from leanvlm.models import load_model
        from leanvlm.reference import ReducedLlava
        from leanvlm.spec.manifest import config_hash

        super().__init__(spec)
        self.torch = torch
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: use {', '.join(DTYPES)}")
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise UserError(f"device {device!r}: {e}") from e
        torch_dtype = getattr(torch, dtype) if dtype else None
        if hf_model is None:
            source = str(model_path or spec.source.get("path", ""))
            if not source or not Path(source).is_dir():
                source = spec.source.get("model", source)
            hf_model = load_model(source, dtype=torch_dtype or torch.float32).model
            if config_hash(hf_model.config.to_dict()) != spec.source.get("config_sha256"):
                raise EngineError(f"torch backend: checkpoint {source} is not the one this engine was exported "
                                  "from (config hash differs); pass model_path= the right checkpoint")
        elif torch_dtype is not None:
            hf_model = hf_model.to(torch_dtype)
        self.dtype = next(hf_model.parameters()).dtype
        self.ref = ReducedLlava(hf_model.to(self.device), spec.schedule, atp_modules).eval()
        self.hidden = spec.model.hidden_size

    def _t(self, x):
        if isinstance(x, np.ndarray):
            x = self.torch.from_numpy(x)
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    @staticmethod
    def _np(xs) -> list[np.ndarray]:
        return [x.cpu().numpy() for x in xs]

    def alloc(self, shape, dtype):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def empty_features(self, batch: int):
        return self.torch.zeros((batch, 0, self.hidden), dtype=self.dtype, device=self.device)

    def vision(self, pixel_values):
        with self.torch.no_grad():
            feats, kept, targets = self.ref.vision(self._t(pixel_values))
        return feats, self._np(kept), self._np(targets)

    def embed(self, input_ids, image_features):
        with self.torch.no_grad():
            return self.ref.embed(self._t(input_ids), self._t(image_features))

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        with self.torch.no_grad():
            logits, presents, kept, targets = self.ref.prefill(self._t(inputs_embeds), self._t(attention_mask),
                                                               self._t(position_ids), self._t(image_start))
        return logits.float().cpu().numpy(), presents, self._np(kept), self._np(targets)

    def decode(self, inputs_embeds, position_ids, masks, past):
        with self.torch.no_grad():
            logits, new_kv = self.ref.decode(self._t(inputs_embeds), self._t(position_ids),
                                             [self._t(m) for m in masks], past)
        return logits.float().cpu().numpy(), new_kv

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def close(self) -> None:
        self.ref = None
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
