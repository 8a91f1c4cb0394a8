"""A stand-in for the `tensorrt` module, for exercising leanvlm's TensorRT code paths where TensorRT cannot be
installed. It is NOT TensorRT and proves nothing about TensorRT itself (its parser, builder, kernels or
numerics): an "engine" here is the ONNX graph run by ONNX Runtime behind the part of TensorRT's Python API the
backend uses (engines, optimisation profiles, execution contexts, tensor addresses, execute_async_v3), with
TensorRT's rules where the backend relies on them:

- an input shape outside the context's profile is refused (set_input_shape returns False);
- output shapes are known once every input shape is set (here: by running the graph on the bound inputs);
- execute_async_v3 reads inputs from and writes outputs to the raw addresses it was given;
- an engine with several profiles needs one context per profile, selected with set_optimization_profile_async.

"Plans" are JSON: {"emulated": true, "onnx": path, "profiles": [{input: [min, opt, max]}]}.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import types
from pathlib import Path

import numpy as np

__version__ = "10.3.0.30"
DESERIALIZED: list[str] = []  # onnx path of every plan deserialized (tests count them)


class _DataType:
    def __init__(self, name: str, np_dtype):
        self.name, self.np_dtype = name, np.dtype(np_dtype)

    def __repr__(self):
        return f"DataType.{self.name}"


float32 = _DataType("FLOAT", np.float32)
float16 = _DataType("HALF", np.float16)
int32 = _DataType("INT32", np.int32)
int64 = _DataType("INT64", np.int64)
int8 = _DataType("INT8", np.int8)
uint8 = _DataType("UINT8", np.uint8)
bool = _DataType("BOOL", np.bool_)  # noqa: A001 - the module attribute TensorRT has
_ORT_TYPES = {"tensor(float)": float32, "tensor(float16)": float16, "tensor(int32)": int32, "tensor(int64)": int64,
              "tensor(int8)": int8, "tensor(uint8)": uint8, "tensor(bool)": bool}


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class Logger:
    WARNING = 2

    def __init__(self, severity=WARNING):
        self.severity = severity


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            plan = json.loads(bytes(data))
        except ValueError:
            return None  # TensorRT returns None for bytes it cannot read
        if not plan.get("emulated"):
            return None
        DESERIALIZED.append(plan["onnx"])
        return _Engine(plan)


class _Engine:
    def __init__(self, plan: dict):
        from leanvlm.engines.onnxruntime import create_session

        self.session = create_session(Path(plan["onnx"]))
        self.profiles = [{k: [tuple(s) for s in v] for k, v in p.items()} for p in plan["profiles"]]
        self.io = {i.name: (TensorIOMode.INPUT, _ORT_TYPES[i.type]) for i in self.session.get_inputs()}
        self.io.update({o.name: (TensorIOMode.OUTPUT, _ORT_TYPES[o.type]) for o in self.session.get_outputs()})
        self.names = list(self.io)
        self.busy_profiles: set[int] = set()

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.io[name][0]

    def get_tensor_dtype(self, name: str):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return list(self.profiles[profile][name])

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.profile = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.outputs: dict[str, np.ndarray] | None = None

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        if index in self.engine.busy_profiles or not 0 <= index < len(self.engine.profiles):
            return False  # TensorRT: a profile serves one context at a time
        self.engine.busy_profiles.add(index)
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.profiles[self.profile or 0][name]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = shape
        self.outputs = None
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if not address:
            return False
        self.addresses[name] = int(address)
        self.outputs = None
        return True

    def _inputs(self) -> dict:
        feed = {}
        for name, (mode, dtype) in self.engine.io.items():
            if mode != TensorIOMode.INPUT:
                continue
            if name not in self.shapes or name not in self.addresses:
                raise RuntimeError(f"input {name} has no shape or address")
            shape = self.shapes[name]
            n = int(np.prod(shape)) * dtype.np_dtype.itemsize
            if n == 0:
                feed[name] = np.zeros(shape, dtype.np_dtype)
                continue
            buf = (ctypes.c_char * n).from_address(self.addresses[name])
            feed[name] = np.frombuffer(buf, dtype=dtype.np_dtype).reshape(shape).copy()
        return feed

    def get_tensor_shape(self, name: str):
        mode = self.engine.io[name][0]
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, ())
        if self.outputs is None:
            names = [o.name for o in self.engine.session.get_outputs()]
            self.outputs = dict(zip(names, self.engine.session.run(None, self._inputs())))
        return tuple(self.outputs[name].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        for name, (mode, dtype) in self.engine.io.items():
            if mode == TensorIOMode.OUTPUT:
                self.get_tensor_shape(name)  # runs the graph once for this binding
        for name, arr in self.outputs.items():
            if name not in self.addresses:
                return False
            arr = np.ascontiguousarray(arr, dtype=self.engine.io[name][1].np_dtype)
            if arr.nbytes:
                ctypes.memmove(self.addresses[name], arr.ctypes.data, arr.nbytes)
        self.outputs = None
        return True


def module() -> types.ModuleType:
    """This module, dressed as `tensorrt` (find_spec needs a spec)."""
    import sys

    mod = sys.modules[__name__]
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    return mod


def build_graph(trt, gb, plan, timing_cache: Path) -> bytes:
    """Stand-in for trt_build._build_graph: an emulated plan, and a timing cache as TensorRT would save one."""
    timing_cache.write_bytes(timing_cache.read_bytes() + b"+" if timing_cache.is_file() else b"emulated cache")
    return json.dumps({"emulated": True, "onnx": str(gb.onnx),
                       "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in gb.profiles]}).encode()


def backend_class():
    """The real TensorRTBackend with its four CUDA specifics pointed at the CPU."""
    from leanvlm.runtime.backends.tensorrt import TensorRTBackend

    class EmulatedTensorRTBackend(TensorRTBackend):
        name = "tensorrt-emulated"
        capability = ("8.7", "emulated Orin")

        def _torch_device(self, index):
            return self.torch.device("cpu")

        def _capability(self):
            return self.capability

        def _stream(self):
            return types.SimpleNamespace(cuda_stream=0)

        def synchronize(self):
            pass

    return EmulatedTensorRTBackend
