"""INT8 and INT4 engines from the exported fp32 graphs, with ONNX Runtime's quantization tools.

- int8: static Q/DQ (`onnxruntime.quantization.quantize_static`, QDQ format), weights int8 symmetric per
  output channel, activations per tensor with ranges from running the fp32 engine on real requests
  (`--calib-data shapes|FILE.jsonl`). Activations are asymmetric uint8 by default: ONNX Runtime's x86 CPU
  kernels fuse that form (U8S8) into QLinearMatMul, and leave a symmetric int8 one as DequantizeLinear +
  float MatMul, slower than fp32 (mid preset decode: 10.6 ms U8S8, 98.5 ms S8S8, 16.9 ms fp32).
  `--int8-activations symmetric` writes the S8S8 graph TensorRT's strongly typed INT8 path takes. Only
  MatMuls with a weight operand are quantized: the attention products, norms, softmax and every node of the
  reduction path (scores, TopK, Gather, merges; their stable names are the exclude list) stay in float.
- int4: weight-only 4-bit for the decoder's MatMuls (`MatMulNBitsQuantizer`: ONNX Runtime's MatMulNBits,
  symmetric blocks of 32 along the input dimension), for CPU and edge decode; vision stays fp32.

What is written by hand here, and why: collecting calibration feeds (the four graphs are run by the runtime
Pipeline, so feeds are captured from a backend rather than built from scratch) and re-sharing the quantized
weights between prefill and decode (each quantizer writes its own copy; `weights.gather_initializers` dedupes
them by content).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from leanvlm.errors import UserError
from leanvlm.spec import names

INT4_BLOCK = 32
DECODE_STEPS_CAPTURED = 3  # decode feeds captured per calibration batch: early steps cover the ranges


def calibration_items(source: str | Path, n: int, seed: int = 1) -> list:
    """Calibration requests: the shapes task's *train* split (disjoint from the held-out evaluation), or a
    JSONL file in `leanvlm eval --data` format. Errors name the flag."""
    from leanvlm.eval.harness import Item, load_jsonl

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--calib-n {n}: must be a positive integer")
    if str(source) == "shapes":
        from leanvlm.eval.shapes import generate

        return [Item(s.image, s.question, s.answers, s.qtype) for s in generate(n, seed, "train")]
    try:
        items = load_jsonl(source)
    except UserError as e:
        raise UserError(str(e).replace("--data", "--calib-data", 1)) from e
    return items[:n]


def capture_feeds(spec, processor, items, batch: int) -> dict[str, list[dict]]:
    """Run the fp32 engine over calibration requests and keep the inputs each graph received."""
    from leanvlm.eval.harness import question_prompt
    from leanvlm.runtime.backends.onnxruntime import OrtBackend
    from leanvlm.runtime.pipeline import Pipeline

    feeds: dict[str, list[dict]] = {g: [] for g in names.GRAPH_NAMES}

    class Capturing(OrtBackend):
        name = "capturing"
        steps = 0

        def _run(self, graph, feed):
            kept = {k: np.array(v) for k, v in feed.items() if k in self.inputs[graph]}
            if graph != "embed" or feed[names.IMAGE_FEATURES].shape[1]:  # not the decode steps' embeds
                feeds[graph].append(kept)
            return super()._run(graph, feed)

        def decode(self, inputs_embeds, position_ids, masks, past):
            if Capturing.steps < DECODE_STEPS_CAPTURED:
                feed = {names.INPUTS_EMBEDS: np.array(inputs_embeds), names.POSITION_IDS: np.array(position_ids),
                        **{names.decode_mask_name(g): np.array(m) for g, m in enumerate(masks)}}
                for i, (k, v) in enumerate(past):  # the cache buffers are reused: copy them
                    feed[names.kv_name("past_key_values", i, "key")] = np.array(k)
                    feed[names.kv_name("past_key_values", i, "value")] = np.array(v)
                feeds["decode"].append(feed)
            Capturing.steps += 1
            return super().decode(inputs_embeds, position_ids, masks, past)

    pipe = Pipeline(spec, Capturing(spec), processor)
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        Capturing.steps = 0
        pipe.generate(images=[i.image for i in chunk], prompts=[question_prompt(i.question) for i in chunk],
                      max_new_tokens=DECODE_STEPS_CAPTURED + 1, ignore_eos=True)
    return feeds


def weight_matmuls(model) -> list[str]:
    """MatMul nodes with a weight (initializer) operand, outside the reduction path."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
            and not names.is_reduction_node(n.name)]


INT8_ACTIVATIONS = ("asymmetric", "symmetric")


def quantize_engine(directory: Path, kind: str, feeds: dict[str, list[dict]] | None,
                    activations: str = "asymmetric") -> dict[str, int]:
    """Quantize the graphs of an fp32 engine directory in place (see the module docstring); the weights
    file is rewritten with every distinct tensor once. Returns each graph's weight bytes."""
    import onnx

    from leanvlm.export.weights import WeightStore, gather_initializers

    graphs = ("vision", "prefill", "decode") if kind == "int8" else ("prefill", "decode")
    work = directory / ".quantize"
    work.mkdir()
    try:
        for g in graphs:
            src, dst = directory / names.graph_file(g), work / names.graph_file(g)
            if kind == "int8":
                _int8(src, dst, feeds[g], activations)
            else:
                _int4(src, dst)
        for g in graphs:  # the quantized graphs replace the fp32 ones (their data files stay in work/)
            shutil.move(str(work / names.graph_file(g)), directory / names.graph_file(g))
        store = WeightStore(work, "weights.onnx.data")
        used = {}
        try:
            for g in names.GRAPH_NAMES:
                path = directory / names.graph_file(g)
                model = onnx.load(str(path), load_external_data=False)
                used[g] = gather_initializers(model, work if g in graphs else directory, store)
                onnx.save_model(model, str(path))
        finally:
            store.close()
        shutil.move(str(store.path), directory / store.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return used


def _int8(src: Path, dst: Path, feeds: list[dict], activations: str) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise UserError("--calib-data: no calibration request reached this graph; give more requests (--calib-n)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    nodes = weight_matmuls(onnx.load(str(src), load_external_data=False))
    logging.disable(logging.WARNING)  # its advice to run shape pre-processing, once per graph, on the root logger
    try:
        symmetric = activations == "symmetric"
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes, use_external_data_format=True,
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    finally:
        logging.disable(logging.NOTSET)


def _int4(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))  # with its weights: the quantizer reads them
    nodes = weight_matmuls(model)
    # accuracy_level 4: the kernel quantizes activations to int8 per block and runs int8 dot products (the fast
    # x86 path; mid preset decode 119 vs 72 tok/s with the default fp32 compute)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4,
                                     nodes_to_include=nodes, op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)

