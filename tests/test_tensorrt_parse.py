"""TensorRT's own ONNX parser on every exported graph: what the lint promises. Runs where TensorRT is installed."""

import pytest

from leanvlm.reduction.schedule import FIXED_METHODS
from leanvlm.spec.names import GRAPH_NAMES


@pytest.mark.tensorrt
@pytest.mark.parametrize("method", FIXED_METHODS)  # adaptive --static-cap: tests/test_adaptive.py
def test_tensorrt_parses_every_graph(engines, method):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    out = engines(0.33, method=method).out
    for graph in GRAPH_NAMES:
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(out / f"{graph}.onnx"))
        assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
