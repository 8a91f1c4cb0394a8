"""The `onnxruntime` backend: the exported graphs in ONNX Runtime sessions. Decode binds the KV buffers with
IO binding (no copy on CPU). Imports no torch."""

from __future__ import annotations

import numpy as np

from leanvlm.runtime.backends.base import Backend
from leanvlm.spec import names
from leanvlm.spec.engine import EngineSpec


class OrtBackend(Backend):
    name = "onnxruntime"
    options = ("providers", "threads", "low_memory")

    def __init__(self, spec: EngineSpec, providers: list[str] | None = None, threads: int | None = None,
                 low_memory: bool = False):
        """low_memory: sessions without graph optimisation, arena or fp32 weight copies (see create_session).
        For half engines on the CPU provider, which ONNX Runtime otherwise runs on an fp32 copy of every
        weight (3.3-3.6x the fp16 weights measured at LLaVA-7B's shapes; 1.9-2.1x with this, decode ~5x slower)."""
        from leanvlm.engines.onnxruntime import create_session

        super().__init__(spec)
        self.sessions = {g: create_session(path, providers, threads, prepack=spec.precision.prepack,
                                           low_memory=low_memory)
                         for g, path in spec.graph_files().items()}
        self.inputs = {g: {i.name for i in s.get_inputs()} for g, s in self.sessions.items()}
        self.outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        self.dtype = np.dtype(spec.precision.io_dtype)
        m = spec.model
        self.hidden, self.num_layers = m.hidden_size, m.num_layers
        self._present = [(names.kv_name("present", i, "key"), names.kv_name("present", i, "value"))
                         for i in range(self.num_layers)]
        self._past = [(names.kv_name("past_key_values", i, "key"), names.kv_name("past_key_values", i, "value"))
                      for i in range(self.num_layers)]

    def _run(self, graph: str, feed: dict) -> dict:
        feed = {k: v for k, v in feed.items() if k in self.inputs[graph]}
        return dict(zip(self.outputs[graph], self.sessions[graph].run(None, feed)))

    def alloc(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def empty_features(self, batch: int):
        return np.zeros((batch, 0, self.hidden), self.dtype)

    def vision(self, pixel_values):
        out = self._run("vision", {names.PIXEL_VALUES: pixel_values})
        return out[names.IMAGE_FEATURES], *_indices(out)

    def embed(self, input_ids, image_features):
        feed = {names.INPUT_IDS: input_ids, names.IMAGE_FEATURES: image_features}
        return self._run("embed", feed)[names.INPUTS_EMBEDS]

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        out = self._run("prefill", {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                                    names.POSITION_IDS: position_ids, names.IMAGE_START: image_start})
        return out[names.LOGITS], [(out[k], out[v]) for k, v in self._present], *_indices(out)

    def decode(self, inputs_embeds, position_ids, masks, past):
        session = self.sessions["decode"]
        binding = session.io_binding()
        binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(inputs_embeds))
        binding.bind_cpu_input(names.POSITION_IDS, position_ids)
        for g, m in enumerate(masks):
            binding.bind_cpu_input(names.decode_mask_name(g), m)
        for (kn, vn), (k, v) in zip(self._past, past):  # the cache buffers themselves: bound, not copied
            binding.bind_cpu_input(kn, k)
            binding.bind_cpu_input(vn, v)
        for name in self.outputs["decode"]:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        out = dict(zip(self.outputs["decode"], binding.copy_outputs_to_cpu()))
        return out[names.LOGITS], [(out[k], out[v]) for k, v in self._present]

    def close(self) -> None:
        self.sessions.clear()


def _indices(out: dict) -> tuple[list, list]:
    """kept_indices.* and merge_targets.* outputs of a graph, each in stage order."""
    return names.indexed_outputs(out, names.KEPT_INDICES), names.indexed_outputs(out, names.MERGE_TARGETS)
