"""torch.onnx.export of one GraphSpec, with either exporter.

TorchScript (`dynamo=False`) is the default: on this torch it exports the tiny model's four graphs in
under a second, where dynamo takes ~25 s (and minutes for 7B-sized models). Both emit opset-18
graphs without fused Attention / RotaryEmbedding / RMSNormalization ops, which TensorRT 10.3 parses.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from leanvlm.export.graphs import GraphSpec
from leanvlm.spec import defaults, names

EXPORTERS = ("torchscript", "dynamo")
# Opsets whose standard ops TensorRT 10.3's parser covers for these graphs; 23 adds fused ops it rejects.
SUPPORTED_OPSETS = range(14, 23)
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # dynamo's record of the module scopes a node came from


def export_graph(spec: GraphSpec, path: Path, store, opset: int = defaults.OPSET,
                 exporter: str = defaults.EXPORTER) -> int:
    """Export `spec` to `path` (ONNX) with its weights in `store` (the engine's shared external-data file) and
    stable names on the reduction path. Returns the bytes of weights the graph references."""
    import onnx

    from leanvlm.export.weights import bind_parameters, gather_initializers

    spec.module.eval()
    kwargs = dict(opset_version=opset, input_names=spec.input_names, output_names=spec.output_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints we intend to be constants
        if exporter == "torchscript":
            # Parameters enter as graph inputs named like the parameters: the exporter never sees their values
            # (its shape inference would copy each weight into a protobuf, and constant folding would rename
            # them), and bind_parameters streams them into the shared file by name.
            wrapper = _WeightsAsInputs(spec.module)
            kwargs["input_names"] = [*spec.input_names, *wrapper.names]
            torch.onnx.export(wrapper, (*spec.example, *wrapper.weights), str(path), dynamo=False,
                              export_params=False, dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
                              **kwargs)
        elif exporter == "dynamo":
            program = torch.onnx.export(spec.module, spec.example, dynamo=True, optimize=True,
                                        dynamic_shapes=_dynamic_shapes(spec), **kwargs)
            program.save(str(path), external_data=True)
        else:
            raise ValueError(f"exporter {exporter!r}: choose one of {EXPORTERS}")
    model = onnx.load(str(path), load_external_data=False)
    if exporter == "torchscript":
        _pin_static_dims(spec, model)
        params = {**dict(spec.module.named_parameters()), **dict(spec.module.named_buffers())}
        used = bind_parameters(model, params, store)
    else:
        own = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
        used = gather_initializers(model, path.parent, store)
        for name in own:
            (path.parent / name).unlink(missing_ok=True)
    stable_node_names(model)
    onnx.save_model(model, str(path))
    return used


class _WeightsAsInputs(torch.nn.Module):
    """`module` with every parameter taken from extra forward inputs (after its own), so a trace records the
    weights as named graph inputs instead of constants. A parameter registered under several names (tied
    weights) is one input."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module
        self.names, self.weights, self._slots = [], [], []
        index: dict[int, int] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) not in index:
                index[id(param)] = len(self.names)
                self.names.append(name)
                self.weights.append(param)
            path, _, attr = name.rpartition(".")
            self._slots.append((module.get_submodule(path), attr, index[id(param)]))

    def forward(self, *args):
        n = len(args) - len(self.weights)
        saved = [(mod, attr, mod._parameters[attr]) for mod, attr, _ in self._slots]
        for mod, attr, i in self._slots:  # bypasses nn.Module.__setattr__: a traced tensor is no Parameter
            mod._parameters[attr] = args[n + i]
        try:
            return self.inner(*args[:n])
        finally:
            for mod, attr, param in saved:
                mod._parameters[attr] = param


def stable_node_names(model) -> int:
    """Rename the nodes of the reduction path to their stable names (leanvlm.spec.names): `/model/layers.2/
    reduce/TopK`, `/model/layers.2/reduce/TopK_1`, ... Returns how many nodes were renamed."""
    taken = {n.name for n in model.graph.node}
    renamed = 0
    for node in model.graph.node:
        recorded = next((p.value for p in node.metadata_props if p.key == _NAME_SCOPES), node.name)
        prefix = names.stable_scope(recorded)
        if prefix is None:
            continue
        base = f"{prefix}/{node.op_type}"
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        node.name = name
        renamed += 1
    return renamed


def graph_io(path: Path) -> dict:
    """Input/output names, shapes (ints or axis names) and element types of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"file": path.name, "opset": opset, "inputs": describe(model.graph.input),
            "outputs": describe(model.graph.output)}


def _pin_static_dims(spec: GraphSpec, model) -> None:
    """Give output axes that are not dynamic their concrete size (TorchScript leaves names like
    `Addpresent.0.key_dim_3` where its shape inference gave up), so IO specs and TensorRT see them."""
    with torch.no_grad():
        outs = spec.module(*spec.example)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for value, tensor in zip(model.graph.output, outs):
        dynamic = spec.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for ax, d in enumerate(dims):
            if ax in dynamic:
                d.dim_param = dynamic[ax]
            else:
                d.dim_value = int(tensor.shape[ax])


def _dynamic_shapes(spec: GraphSpec) -> tuple:
    """dynamic_axes (names per input axis) -> torch.export dims, one Dim object per axis name.

    Decode masks are one longer than their group's past: expressed as a derived dim so the exporter
    keeps the relation instead of failing on an unrelated free symbol.
    """
    dims: dict[str, object] = {}

    def dim(name: str):
        if name.startswith("total_sequence_length_"):
            return dim(name.replace("total_", "past_")) + 1
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1 if name == "batch_size" else 2)
        return dims[name]

    shapes = []
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        shapes.append({ax: dim(n) for ax, n in axes.items()} or None)
    # torch.export sees `forward(a, b, *rest)` as three arguments: nest the shapes the same way.
    params = inspect.signature(spec.module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        n_fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        return (*shapes[:n_fixed], tuple(shapes[n_fixed:]))
    return tuple(shapes)
