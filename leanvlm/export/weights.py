"""One copy of the weights for every graph of an engine, written as they are exported.

The graphs are exported without their parameters (`export_params=False`: the protobuf holds no weights, so
no graph is bound by protobuf's 2 GiB limit and the exporter never copies them). Each graph's parameter inputs
are then turned into initializers whose bytes live in one external-data file, `weights.onnx.data`, shared by
all graphs: a tensor used by the prefill and the decode graph (every decoder layer, the norm, lm_head) is
written once and both graphs point at the same offset. ONNX Runtime maps that file, so two sessions read the
same pages (with weight prepacking off, see engines.onnxruntime).

Writing streams one tensor at a time: export memory is the model plus the largest tensor, and the file grows
by the weights' size once. `Transpose(W)` feeding a MatMul (how the TorchScript exporter writes nn.Linear
without constant folding) is folded here, one tensor at a time, into a stored `W.T`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS_FILE = "weights.onnx.data"
ALIGN = 4096  # page-aligned offsets: each tensor maps on its own pages
INLINE_BYTES = 1024  # smaller tensors stay in the graph (ONNX's usual size_threshold)


def _onnx_type(dtype) -> int:
    from onnx import TensorProto

    name = str(dtype).replace("torch.", "")
    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
            "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int8": TensorProto.INT8,
            "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL, "float64": TensorProto.DOUBLE}[name]


def _raw_bytes(tensor) -> memoryview:
    """The bytes of a torch tensor or numpy array in C order (bfloat16 through its 16-bit pattern)."""
    import torch

    if isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        array = t.numpy()
    else:
        array = np.ascontiguousarray(tensor)
    return memoryview(array).cast("B")


class WeightStore:
    """The shared external-data file of one engine directory. `add` writes a tensor once per key."""

    def __init__(self, directory: Path, name: str = WEIGHTS_FILE):
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / name
        self._file = open(self.path, "wb")
        self._where: dict[object, tuple[int, int]] = {}
        self.bytes_written = 0

    def add(self, key, data: memoryview) -> tuple[int, int]:
        """(offset, length) of the tensor stored under `key`, writing `data` if the key is new."""
        if key not in self._where:
            offset = -self._file.tell() % ALIGN
            if offset:
                self._file.write(b"\0" * offset)
            start = self._file.tell()
            self._file.write(data)
            self._where[key] = (start, len(data))
            self.bytes_written += len(data)
        return self._where[key]

    def initializer(self, name: str, key, tensor, dims: list[int] | None = None):
        """A TensorProto named `name` for `tensor` (torch or numpy), its bytes in this file (or inline when
        small). `key` identifies the bytes across graphs."""
        from onnx import TensorProto

        proto = TensorProto(name=name, data_type=_onnx_type(tensor.dtype),
                            dims=list(tensor.shape if dims is None else dims))
        nbytes = tensor.numel() * tensor.element_size() if hasattr(tensor, "numel") else tensor.nbytes
        if nbytes < INLINE_BYTES:
            proto.raw_data = bytes(_raw_bytes(tensor))
            return proto
        offset, length = self._where.get(key) or self.add(key, _raw_bytes(tensor))
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        return proto

    def close(self) -> None:
        self._file.close()


def bind_parameters(model, params: dict, store: WeightStore) -> int:
    """Turn a graph's parameter inputs (exported with export_params=False) into initializers in `store`;
    fold `Transpose` of a 2-D parameter into a stored transposed tensor. Returns the bytes the graph uses."""
    graph = model.graph
    bound = [i for i in graph.input if i.name in params]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    used = 0
    drop_nodes = []
    for value in bound:
        name, tensor = value.name, params[value.name]
        graph.input.remove(value)
        plain = False
        for node in consumers.get(name, []):
            if node.op_type == "Transpose" and tensor.dim() == 2 and _perm(node) in (None, [1, 0]):
                folded = f"{name}.T"
                if not any(init.name == folded for init in graph.initializer):
                    graph.initializer.append(store.initializer(folded, (name, "T"), tensor.t()))
                    used += tensor.numel() * tensor.element_size()
                _rename_input(consumers.get(node.output[0], []), node.output[0], folded)
                drop_nodes.append(node)
            else:
                plain = True
        if plain:
            graph.initializer.append(store.initializer(name, (name, ""), tensor))
            used += tensor.numel() * tensor.element_size()
    for node in drop_nodes:
        graph.node.remove(node)
    return used


def gather_initializers(model, base_dir: Path, store: WeightStore) -> int:
    """Move every initializer of a graph (inline or in its own external-data files) into `store`, keyed by
    content so graphs share equal tensors, and inline the tensors of Constant nodes that a tool wrote out;
    the old external files are left for the caller to delete. Returns the bytes the graph's initializers use."""
    import hashlib

    from onnx import TensorProto, numpy_helper

    def read(tensor) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL:
            return np.frombuffer(numpy_helper.to_array(tensor).tobytes(), dtype=np.uint8)
        info = {e.key: e.value for e in tensor.external_data}
        with open(Path(base_dir) / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = f.read(int(info["length"])) if "length" in info else f.read()
        return np.frombuffer(data, dtype=np.uint8)

    used = 0
    for i, init in enumerate(model.graph.initializer):
        array = read(init)
        key = (init.data_type, tuple(init.dims), hashlib.blake2b(array, digest_size=20).hexdigest())
        proto = store.initializer(init.name, key, array, dims=list(init.dims))
        proto.data_type = init.data_type
        model.graph.initializer[i].CopyFrom(proto)
        used += array.size
    for node in model.graph.node:
        for attr in node.attribute:
            for tensor in [attr.t] if attr.HasField("t") else list(attr.tensors):
                if tensor.data_location == TensorProto.EXTERNAL:
                    data = read(tensor).tobytes()
                    del tensor.external_data[:]
                    tensor.data_location = TensorProto.DEFAULT
                    tensor.raw_data = data
    return used


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _rename_input(nodes, old: str, new: str) -> None:
    for node in nodes:
        for j, name in enumerate(node.input):
            if name == old:
                node.input[j] = new
