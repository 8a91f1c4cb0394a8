"""The `onnxruntime` backend: the exported graphs in ONNX Runtime sessions. Imports no torch.

Decode is the hot loop of generation, so its per-step work is kept to one session run: the KV buffers,
masks and output buffers stay bound in one IO binding per thread across the steps of a request (an input
is rebound only when the caller passes another array; ONNX Runtime reads CPU arrays in place, so the
runtime's in-place cache writes are seen without rebinding), and the outputs are written into preallocated
arrays instead of being allocated and copied each step."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from leanvlm.errors import UserError
from leanvlm.runtime.backends.base import Backend
from leanvlm.spec import names
from leanvlm.spec.engine import EngineSpec


class OrtBackend(Backend):
    name = "onnxruntime"
    options = ("providers", "threads", "low_memory", "prepack")

    def __init__(self, spec: EngineSpec, providers: list[str] | None = None, threads: int | None = None,
                 low_memory: bool = False, prepack: bool | str | None = None):
        """low_memory: sessions without graph optimisation, arena or fp32 weight copies (see create_session).
        For half engines on the CPU provider, which ONNX Runtime otherwise runs on an fp32 copy of every
        weight (3.3-3.6x the fp16 weights measured at LLaVA-7B's shapes; 1.9-2.1x with this, decode ~5x slower).

        prepack: ONNX Runtime weight prepacking (CPU). True / False: every session. "decode": the decode session
        only, which then holds a packed copy of the decoder weights (anonymous memory, at most the size of the
        weights file) and runs its single-row MatMuls on MLAS's packed kernels, the faster path for the decode
        loop (mid preset, 1 thread: 80 -> 100 tok/s; GenAI's sessions prepack too); prefill and the other
        graphs read the one memory-mapped weights file. None (default): quantized engines prepack every
        session (their kernels need it); float engines prepack decode when that copy is small next to the
        machine's memory (weights file <= 1/4 of physical memory: every small and mid model, not a 7B in fp32)
        and not `low_memory`. LEANVLM_ORT_PREPACK=decode chooses "decode" where no option is given (the CLI);
        LEANVLM_ORT_PREPACK=0|1 overrides every session (see create_session)."""
        from leanvlm.engines.onnxruntime import create_session

        super().__init__(spec)
        if prepack is None and os.environ.get("LEANVLM_ORT_PREPACK") == "decode":  # the CLI's way to choose it
            prepack = "decode"
        if prepack not in (None, True, False, "decode"):
            raise UserError(f"prepack {prepack!r}: use True, False, 'decode' or None (the precision's choice)")
        if prepack is None and not spec.precision.prepack and not low_memory and _packed_copy_fits(spec):
            prepack = "decode"
        self.prepack = prepack
        default = spec.precision.prepack if prepack in (None, "decode") else prepack
        self.sessions = {g: create_session(path, providers, threads, low_memory=low_memory,
                                           prepack=True if prepack == "decode" and g == "decode" else default)
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
        self._local = threading.local()  # each thread's decode binding (see _DecodeBinding)
        self._tokens = TokenTable.from_graph(spec.graph_files()["embed"], m.image_token_id)

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
        if image_features.shape[1] == 0:  # a decode step: the token rows straight from the mapped table
            rows = self._tokens.lookup(input_ids) if self._tokens is not None else None
            if rows is not None:
                return rows
        feed = {names.INPUT_IDS: input_ids, names.IMAGE_FEATURES: image_features}
        return self._run("embed", feed)[names.INPUTS_EMBEDS]

    def prefill(self, inputs_embeds, attention_mask, position_ids, image_start):
        out = self._run("prefill", {names.INPUTS_EMBEDS: inputs_embeds, names.ATTENTION_MASK: attention_mask,
                                    names.POSITION_IDS: position_ids, names.IMAGE_START: image_start})
        return out[names.LOGITS], [(out[k], out[v]) for k, v in self._present], *_indices(out)

    def decode(self, inputs_embeds, position_ids, masks, past):
        """See Backend.decode. The returned arrays are this thread's output buffers: the next decode call on
        the same thread overwrites them."""
        state = self._decode_state()
        state.bind(names.INPUTS_EMBEDS, inputs_embeds)
        state.bind(names.POSITION_IDS, position_ids)
        for g, m in enumerate(masks):
            state.bind(names.decode_mask_name(g), m)
        for (kn, vn), (k, v) in zip(self._past, past):  # the cache buffers themselves: bound, not copied
            state.bind(kn, k)
            state.bind(vn, v)
        state.bind_outputs(inputs_embeds.shape[0])
        self.sessions["decode"].run_with_iobinding(state.binding)
        out = state.results()
        return out[names.LOGITS], [(out[k], out[v]) for k, v in self._present]

    def _decode_state(self) -> "_DecodeBinding":
        state = getattr(self._local, "decode", None)
        if state is None:
            state = self._local.decode = _DecodeBinding(self.sessions["decode"], self.dtype)
        return state

    def close(self) -> None:
        self.sessions.clear()
        self._local = threading.local()


def _packed_copy_fits(spec: EngineSpec) -> bool:
    """Whether a packed copy of the engine's weights (decode's are a part of them) is at most a quarter of
    physical memory."""
    from leanvlm.export.weights import WEIGHTS_FILE

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        weights = (spec.graph_files()["decode"].parent / WEIGHTS_FILE).stat().st_size
    except (OSError, ValueError, KeyError):
        return False
    return weights * 4 <= memory


class _DecodeBinding:
    """One thread's IO binding of the decode graph, bound by address (ONNX Runtime reads CPU memory in place).

    Inputs are remembered by address and shape and rebound only when the caller passes other memory (the
    cache's per-step views `buffer[:rows]` of one buffer bind once per request). Binding by address keeps no
    reference, so a finished request's cache is freed as soon as its owner drops it (a binding made from arrays
    would hold it until the thread's next decode). Every input is passed on every call, so a stale address is
    always rebound before a run."""

    def __init__(self, session, float_dtype):
        self.binding = session.io_binding()
        self._in_types = {i.name: _NP_TYPES.get(i.type, float_dtype) for i in session.get_inputs()}
        outs = session.get_outputs()
        self._names = [o.name for o in outs]
        self._out_types = {o.name: _NP_TYPES.get(o.type, float_dtype) for o in outs}
        # all but the batch axis are static in decode.onnx (export pins them); otherwise ORT allocates outputs
        self._out_dims = {o.name: o.shape[1:] for o in outs}
        self._preallocate = all(isinstance(d, int) for dims in self._out_dims.values() for d in dims)
        self._bound: dict[str, tuple | None] = {}
        self._batch = None
        self._outputs: dict[str, np.ndarray] = {}
        self._keep: list = []  # converted copies made for this call: alive until its run returns

    def bind(self, name: str, array) -> None:
        """Bind `array` as input `name` unless that input is already bound to the same memory (address, shape
        and type: what ONNX Runtime reads at run time), as the cache's per-step views of one buffer are; inputs
        the graph does not take are skipped."""
        dtype = self._in_types.get(name)
        if dtype is None:
            return
        if isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous:
            data = array
            key = (array.__array_interface__["data"][0], array.shape)
            if self._bound.get(name) == key:
                return
        else:  # a converted copy is new every call: remembering it would only ever miss
            data = np.ascontiguousarray(array, dtype=dtype)
            self._keep.append(data)
            key = None
        self.binding.bind_input(name, "cpu", 0, data.dtype.type, list(data.shape), data.ctypes.data)
        self._bound[name] = key

    def bind_outputs(self, batch: int) -> None:
        """Bind this thread's output arrays for `batch` rows (allocated when the batch size changes)."""
        if batch == self._batch:
            return
        if self._preallocate:
            self._outputs = {n: np.empty((batch, *self._out_dims[n]), self._out_types[n]) for n in self._names}
            for n, a in self._outputs.items():
                self.binding.bind_output(n, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)
        else:
            for n in self._names:
                self.binding.bind_output(n, "cpu")
        self._batch = batch

    def results(self) -> dict[str, np.ndarray]:
        """The outputs of the run that just returned; drops this call's converted inputs."""
        self._keep = []
        if self._preallocate:
            return self._outputs
        return dict(zip(self._names, self.binding.copy_outputs_to_cpu()))


class TokenTable:
    """The embed graph's token-embedding table, read in place from the engine's memory-mapped weights file.

    A decode step embeds one token per request with no image features: running the embed graph for that is
    a session run (~0.1 ms here) around a row copy. `lookup` gives the graph's exact result (the table's rows;
    the `<image>` token embeds to zeros when no features are given, as the graph's splice does) and None
    where it would differ from running the graph (ids out of range: the graph reports those)."""

    def __init__(self, table: np.ndarray, image_token_id: int):
        self.table, self.image_token_id = table, image_token_id

    @classmethod
    def from_graph(cls, path, image_token_id: int) -> "TokenTable | None":
        """The table behind embed.onnx's Gather on input_ids when it is a plain float tensor in an external-data
        file (every float engine and the quantized ones, which keep it in float); None otherwise."""
        import onnx
        from onnx import TensorProto

        model = onnx.load(str(path), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        node = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == names.INPUT_IDS
                     and n.input[0] in inits), None)
        if node is None:
            return None
        init = inits[node.input[0]]
        dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(init.data_type)
        info = {e.key: e.value for e in init.external_data}
        if dtype is None or init.data_location != TensorProto.EXTERNAL or len(init.dims) != 2:
            return None
        shape = tuple(init.dims)
        if int(info.get("length", -1)) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            return None
        table = np.memmap(Path(path).parent / info["location"], dtype=dtype, mode="r",
                          offset=int(info.get("offset", 0)), shape=shape)
        return cls(np.asarray(table), image_token_id)  # a plain ndarray view: memmap's subclass hooks cost per call

    def lookup(self, input_ids) -> np.ndarray | None:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu" or ids.size == 0 or ids.min() < 0 or ids.max() >= self.table.shape[0]:
            return None
        rows = self.table.take(ids, axis=0)
        if (ids == self.image_token_id).any():
            rows[ids == self.image_token_id] = 0
        return rows


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _indices(out: dict) -> tuple[list, list]:
    """kept_indices.* and merge_targets.* outputs of a graph, each in stage order."""
    return names.indexed_outputs(out, names.KEPT_INDICES), names.indexed_outputs(out, names.MERGE_TARGETS)
