"""Engine builders: ONNX Runtime sessions, TensorRT builds and the TensorRT-compatibility lint."""
