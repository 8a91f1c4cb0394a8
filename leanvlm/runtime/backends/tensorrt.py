"""The `tensorrt` backend: the plans `leanvlm build --target trt` made for this GPU, run with TensorRT's
runtime on one CUDA stream.

- Plans are picked from the manifest's build records for this device (compute capability + TensorRT release
  + the engine's precision) and refused before deserialization when none fits (trt_build.select_build).
- One execution context per (graph, optimisation profile): the embed graph has a prefill context (profile 0)
  and a decode context (profile 1, one token, no image features), the others one each.
- Device buffers are torch CUDA tensors: inputs are copied to the device once, every tensor address is a
  tensor's data_ptr, `execute_async_v3` is queued on torch's current stream, the stream the KV cache's
  in-place writes are queued on too, so they are ordered without extra synchronisation. A lock serialises
  runs (an execution context holds the shapes of the run in flight). Phases hand each other device
  tensors (features -> embed -> prefill/decode); the KV cache (runtime/kv_cache.KVCache) allocates its
  per-group buffers here, so the prefill's presents and each decode step's new entries are written into them
  on the device, and decode reads the whole buffers in place. Only logits and kept indices come back to the
  host.
- Shapes outside a plan's profiles are refused with the limits the plan was built for.

Why torch for device memory: the KV cache writes prompt and decoded entries into its buffers by slice
assignment, which torch CUDA tensors do on the device in one call; with cuda-python each would be a
hand-written strided cudaMemcpy2DAsync over raw pointers. The cost is torch on the device (NVIDIA's JetPack
wheel); the onnxruntime backend needs no torch (README: TensorRT and Jetson).

Nothing here has run on a real TensorRT installation (none is reachable from where it was written); the
plan selection and refusals it relies on are tested without TensorRT.
"""

from __future__ import annotations

import threading

import numpy as np

from leanvlm.engines import trt_build
from leanvlm.engines.trt_profiles import profile_for
from leanvlm.errors import EngineError, UserError
from leanvlm.runtime.backends.base import Backend
from leanvlm.spec import names
from leanvlm.spec.engine import EngineSpec


class TensorRTBackend(Backend):
    name = "tensorrt"
    options = ("device",)

    def __init__(self, spec: EngineSpec, device: int = 0):
        trt = trt_build.import_tensorrt()
        try:
            import torch
        except ImportError:
            raise UserError("the tensorrt backend keeps its device buffers in torch CUDA tensors: install torch "
                            "with CUDA (on a Jetson: NVIDIA's JetPack wheel)") from None
        super().__init__(spec)
        self.trt, self.torch = trt, torch
        self.device = self._torch_device(device)
        from leanvlm.engines.trt_targets import device_target

        here = device_target(trt.__version__, *self._capability())
        self.record = trt_build.select_build(spec, here)  # refuses a foreign plan before deserializing it
        self.limits = self.record.get("limits", {})
        self.lock = threading.Lock()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for graph, entry in self.record["graphs"].items():
            path = spec.directory / entry["file"]
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"{path}: TensorRT could not deserialize this plan; rebuild on this device: "
                                  f"leanvlm build {spec.directory} --target trt")
            self.engines[graph] = engine
            for p in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                if ctx is None or not ctx.set_optimization_profile_async(p, self._stream().cuda_stream):
                    raise EngineError(f"{path}: TensorRT could not open an execution context for profile {p}")
                self.contexts[(graph, p)] = ctx
        self.io = {g: self._io(e) for g, e in self.engines.items()}
        m = spec.model
        self.hidden, self.num_layers = m.hidden_size, m.num_layers
        self.dtype = getattr(torch, spec.precision.io_dtype)
        self._present = [(names.kv_name("present", i, "key"), names.kv_name("present", i, "value"))
                         for i in range(self.num_layers)]
        self._past = [(names.kv_name("past_key_values", i, "key"), names.kv_name("past_key_values", i, "value"))
                      for i in range(self.num_layers)]
        self._scratch = torch.empty(1, dtype=torch.uint8, device=self.device)  # address of empty tensors

    # ---- the CUDA specifics (four methods, so the rest can be exercised off-GPU; see tests) -------------
    def _torch_device(self, index: int):
        if not self.torch.cuda.is_available():
            raise UserError("the tensorrt backend needs a CUDA GPU; torch sees none here")
        return self.torch.device("cuda", index)

    def _capability(self) -> tuple[str, str]:
        """(compute capability "8.7", GPU name) of the backend's device."""
        cuda = self.torch.cuda
        return "{}.{}".format(*cuda.get_device_capability(self.device)), cuda.get_device_name(self.device)

    def _stream(self):
        return self.torch.cuda.current_stream(self.device)

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    # ---- plumbing ----------------------------------------------------------------------------------

    def _io(self, engine) -> dict:
        """name -> (is_input, torch dtype) for every IO tensor of an engine."""
        trt, torch = self.trt, self.torch
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                  trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8}
        if hasattr(trt, "bfloat16"):
            dtypes[trt.bfloat16] = torch.bfloat16
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            out[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, dtypes[engine.get_tensor_dtype(name)])
        return out

    def _device(self, x, dtype):
        """x (numpy or torch) as a contiguous device tensor of `dtype`, copied only if it is not one already."""
        torch = self.torch
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        return x.to(device=self.device, dtype=dtype, non_blocking=True).contiguous()

    def _check_shape(self, graph: str, profile: int, name: str, shape: tuple) -> None:
        lo, _, hi = self.engines[graph].get_tensor_profile_shape(name, profile)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise UserError(f"{graph}: input {name} of shape {tuple(shape)} is outside the TensorRT plan's profile "
                            f"[{tuple(lo)} .. {tuple(hi)}] (built for {self.limits}); rebuild with larger limits: "
                            f"leanvlm build {self.spec.directory} --target trt")

    def _run(self, graph: str, feed: dict, phase: str = "prefill") -> dict:
        """Run one graph on device tensors; returns its outputs as device tensors."""
        torch = self.torch
        profile = profile_for(graph, phase)
        ctx = self.contexts[(graph, profile)]
        io = self.io[graph]
        with self.lock:
            bound = {}
            for name, (is_input, dtype) in io.items():
                if not is_input:
                    continue
                if name not in feed:
                    raise EngineError(f"{graph}: the plan wants input {name}, which the runtime does not feed")
                t = self._device(feed[name], dtype)
                self._check_shape(graph, profile, name, tuple(t.shape))
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(f"{graph}: TensorRT refused shape {tuple(t.shape)} for input {name}")
                ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._scratch.data_ptr())
                bound[name] = t  # keep alive until the stream has run
            out = {}
            for name, (is_input, dtype) in io.items():
                if is_input:
                    continue
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=dtype, device=self.device)
                ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._scratch.data_ptr())
                out[name] = t
            if not ctx.execute_async_v3(self._stream().cuda_stream):
                raise EngineError(f"{graph}: TensorRT execution failed (see its log)")
            out["_inputs"] = bound
        return out

    @staticmethod
    def _host(t) -> np.ndarray:
        """Read back (waits for the stream's work up to here)."""
        return t.float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()

    def _indices(self, out: dict) -> tuple[list, list]:
        kept = [self._host(t) for t in names.indexed_outputs(out, names.KEPT_INDICES)]
        targets = [self._host(t) for t in names.indexed_outputs(out, names.MERGE_TARGETS)]
        return kept, targets

    # ---- the Backend interface ---------------------------------------------------------------------------
    def alloc(self, shape, dtype):
        return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def empty_features(self, batch: int):
        return self.torch.zeros((batch, 0, self.hidden), dtype=self.dtype, device=self.device)

    def vision(self, pixel_values):
        out = self._run("vision", {names.PIXEL_VALUES: pixel_values})
        return out[names.IMAGE_FEATURES], *self._indices(out)

    def embed(self, input_ids, image_features):
        phase = "decode" if image_features.shape[1] == 0 else "prefill"
        out = self._run("embed", {names.INPUT_IDS: input_ids, names.IMAGE_FEATURES: image_features}, phase)
        return out[names.INPUTS_EMBEDS]

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        out = self._run("prefill", {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                                    names.POSITION_IDS: position_ids, names.IMAGE_START: image_start})
        return self._host(out[names.LOGITS]), [(out[k], out[v]) for k, v in self._present], *self._indices(out)

    def decode(self, inputs_embeds, position_ids, masks, past):
        feed = {names.INPUTS_EMBEDS: inputs_embeds, names.POSITION_IDS: position_ids}
        feed.update({names.decode_mask_name(g): m for g, m in enumerate(masks)})
        for (kn, vn), (k, v) in zip(self._past, past):  # the cache buffers themselves, by address
            feed[kn], feed[vn] = k, v
        out = self._run("decode", feed, "decode")
        return self._host(out[names.LOGITS]), [(out[k], out[v]) for k, v in self._present]

    def close(self) -> None:
        if getattr(self, "engines", None):
            self.synchronize()
        self.contexts, self.engines = {}, {}
