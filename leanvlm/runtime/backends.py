"""Backends run the four phases (vision, embed, prefill, decode) of an engine directory.

- `onnxruntime`: the exported graphs. Decode binds the KV buffers with IO binding (no copy on CPU).
- `torch`: the PyTorch reference (`ReducedLlava`) of the manifest's schedule, on CPU or CUDA, loaded
  from the source checkpoint the manifest names and checked against its config hash.

Arrays stay in the backend's own kind between phases; logits and kept indices come back as numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leanvlm.errors import EngineError, UserError
from leanvlm.export.graphs import GRAPH_NAMES
from leanvlm.export.manifest import Manifest

BACKENDS = ("onnxruntime", "torch")


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, providers: list[str] | None = None, threads: int | None = None):
        from leanvlm.engines.onnxruntime import create_session

        self.manifest = manifest
        self.sessions = {g: create_session(manifest.graph_path(g), providers, threads) for g in GRAPH_NAMES}
        self.inputs = {g: {i.name for i in s.get_inputs()} for g, s in self.sessions.items()}
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self.hidden = manifest["model"]["hidden_size"]
        self.num_layers = manifest["model"]["num_layers"]

    def _run(self, graph: str, feed: dict) -> dict:
        feed = {k: v for k, v in feed.items() if k in self.inputs[graph]}
        return dict(zip(self.outputs[graph], self.sessions[graph].run(None, feed)))

    def alloc(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def empty_features(self, batch: int):
        return np.zeros((batch, 0, self.hidden), np.float32)

    def vision(self, pixel_values):
        out = self._run("vision", {"pixel_values": pixel_values})
        return out["image_features"], *_indices(out)

    def embed(self, input_ids, image_features):
        return self._run("embed", {"input_ids": input_ids, "image_features": image_features})["inputs_embeds"]

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        out = self._run("prefill", {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                                    "position_ids": position_ids, "image_start": image_start})
        presents = [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.num_layers)]
        return out["logits"], presents, *_indices(out)

    def decode(self, inputs_embeds, position_ids, masks, past):
        session = self.sessions["decode"]
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds))
        binding.bind_cpu_input("position_ids", position_ids)
        for g, m in enumerate(masks):
            binding.bind_cpu_input(f"attention_mask.{g}", m)
        for i, (k, v) in enumerate(past):  # the cache buffers themselves: bound, not copied
            binding.bind_cpu_input(f"past_key_values.{i}.key", k)
            binding.bind_cpu_input(f"past_key_values.{i}.value", v)
        for name in self.outputs["decode"]:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        out = dict(zip(self.outputs["decode"], binding.copy_outputs_to_cpu()))
        return out["logits"], [(out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.num_layers)]


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: Manifest, device: str | None = None, dtype: str | None = None,
                 model_path: str | Path | None = None, hf_model=None):
        """hf_model: an already loaded LlavaForConditionalGeneration to share (no load, no hash check)."""
        import torch

        from leanvlm.export.manifest import config_hash
        from leanvlm.models import load_model
        from leanvlm.reduction.schedule import Schedule
        from leanvlm.reference import ReducedLlava

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            dtype or "float32")
        if torch_dtype is None:
            raise UserError(f"dtype {dtype!r}: use float32, float16 or bfloat16")
        if hf_model is None:
            source = str(model_path or manifest["source"]["path"])
            if not Path(source).is_dir():
                source = manifest["source"]["model"]
            hf_model = load_model(source, dtype=torch_dtype).model
            if config_hash(hf_model.config.to_dict()) != manifest["source"]["config_sha256"]:
                raise EngineError(f"torch backend: checkpoint {source} is not the one this engine was exported "
                                  "from (config hash differs); pass model_path= the right checkpoint")
        self.dtype = next(hf_model.parameters()).dtype
        self.ref = ReducedLlava(hf_model.to(self.device), Schedule.from_dict(manifest["schedule"])).eval()
        self.hidden = manifest["model"]["hidden_size"]

    def _t(self, x):
        if isinstance(x, np.ndarray):
            x = self.torch.from_numpy(x)
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def alloc(self, shape, dtype):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device)

    def empty_features(self, batch: int):
        return self.torch.zeros((batch, 0, self.hidden), dtype=self.dtype, device=self.device)

    def vision(self, pixel_values):
        with self.torch.no_grad():
            feats, kept, targets = self.ref.vision(self._t(pixel_values))
        return feats, [k.cpu().numpy() for k in kept], [t.cpu().numpy() for t in targets]

    def embed(self, input_ids, image_features):
        with self.torch.no_grad():
            return self.ref.embed(self._t(input_ids), self._t(image_features))

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        with self.torch.no_grad():
            logits, presents, kept, targets = self.ref.prefill(self._t(inputs_embeds), self._t(attention_mask),
                                                               self._t(position_ids), self._t(image_start))
        return (logits.float().cpu().numpy(), presents, [k.cpu().numpy() for k in kept],
                [t.cpu().numpy() for t in targets])

    def decode(self, inputs_embeds, position_ids, masks, past):
        with self.torch.no_grad():
            logits, new_kv = self.ref.decode(self._t(inputs_embeds), self._t(position_ids),
                                             [self._t(m) for m in masks], past)
        return logits.float().cpu().numpy(), new_kv

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def _indices(out: dict) -> tuple[list, list]:
    """kept_indices.* and merge_targets.* outputs of a graph, each in stage order."""
    def pick(prefix):
        return [out[k] for k in sorted((k for k in out if k.startswith(prefix)), key=lambda k: int(k.split(".")[1]))]

    return pick("kept_indices."), pick("merge_targets.")


def make_backend(manifest: Manifest, backend: str, **options):
    """Instantiate `backend` ('onnxruntime' or 'torch') over a validated manifest."""
    if backend == "onnxruntime":
        return OrtBackend(manifest, options.get("providers"), options.get("threads"))
    if backend == "torch":
        return TorchBackend(manifest, options.get("device"), options.get("dtype"), options.get("model_path"))
    raise UserError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
