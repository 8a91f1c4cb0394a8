"""Numeric precision of an engine: the dtypes of its float inputs/outputs and how closely its graphs must
agree with the fp32 PyTorch reference.

One record per precision; export, verification, parity, the KV cache and the backends read dtypes and
tolerances from here instead of writing literals.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanvlm.errors import UserError


@dataclass(frozen=True)
class Precision:
    """name: the `--precision` value. io_dtype: numpy dtype name of the float tensors crossing graph
    boundaries (pixel values, image features, embeddings, KV cache; logits are always float32). torch_dtype:
    the dtype the graphs are traced in, and the torch backend's for that precision.

    Tolerances are checked against the fp32 reference on the same inputs: on last-token logits and on every
    other float output (KV entries, features). fp32's are absolute; the reduced precisions' are relative to
    the largest reference value of that output (max(1, max|ref|) * tolerance). kept_overlap: the fraction of
    each row's kept indices that must agree (1.0: equal; lower where near-tied scores may flip), and
    greedy_agreement: of greedy tokens over a parity run. For int8 and int4 the export check catches broken
    graphs; their quality is their accuracy (benchmarks/) and greedy agreement (`leanvlm parity`)."""

    name: str
    io_dtype: str
    torch_dtype: str
    logits_atol: float
    kv_atol: float
    kept_overlap: float = 1.0
    greedy_agreement: float = 1.0
    quantize: str | None = None  # post-export weight quantization: "int8" (static Q/DQ), "int4" (MatMulNBits)
    relative: bool = True
    # ONNX Runtime CPU: whether sessions prepack weights. Float engines share one memory-mapped copy between
    # prefill and decode instead; the quantized kernels (QLinearMatMul, MatMulNBits) need their packed form
    # (int4 decode measured 6.9 tok/s without it, 93 with it, on the mid preset).
    prepack: bool = False

    @property
    def half(self) -> bool:
        """Half-precision graphs: ONNX Runtime's CPU provider runs them on fp32 copies of the weights unless the
        sessions are opened with low_memory (see engines.onnxruntime.create_session)."""
        return self.io_dtype != "float32"

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}[self.io_dtype]

    def tolerance(self, output: str, reference_max: float) -> float:
        """The largest |engine - reference| accepted on `output` whose reference peaks at reference_max."""
        atol = self.logits_atol if output == "logits" else self.kv_atol
        return atol * max(1.0, reference_max) if self.relative else atol

    def to_dict(self) -> dict:
        return {"name": self.name, "io_dtype": self.io_dtype, "graph_dtype": self.torch_dtype,
                "quantize": self.quantize, "prepack": self.prepack, "logits_atol": self.logits_atol, "kv_atol": self.kv_atol,
                "relative": self.relative, "kept_overlap": self.kept_overlap,
                "greedy_agreement": self.greedy_agreement}


PRECISIONS: dict[str, Precision] = {
    # fp32 graphs against the fp32 reference: only the order of float additions differs (absolute).
    "fp32": Precision("fp32", "float32", "float32", logits_atol=1e-4, kv_atol=1e-4, relative=False),
    # fp16 keeps ~3 significant digits: 2% of the output's range leaves room for depth. Near-tied scores
    # may select another token: 90% of the kept indices must agree.
    "fp16": Precision("fp16", "float16", "float16", logits_atol=0.02, kv_atol=0.02, kept_overlap=0.9,
                      greedy_agreement=0.9),
    # bfloat16 keeps ~2 significant digits: five times fp16's.
    "bf16": Precision("bf16", "bfloat16", "bfloat16", logits_atol=0.1, kv_atol=0.1, kept_overlap=0.8,
                      greedy_agreement=0.8),
    # Weights in 8 bits per output channel (symmetric), activations in 8 bits per tensor (calibrated:
    # asymmetric uint8 by default, the form ONNX Runtime's x86 kernels fuse; symmetric int8 for TensorRT); fp32 IO.
    "int8": Precision("int8", "float32", "float32", logits_atol=0.5, kv_atol=0.5, kept_overlap=0.5,
                      greedy_agreement=0.5, quantize="int8", prepack=True),
    # Decoder MatMul weights in 4 bits (symmetric blocks of 32); everything else fp32.
    "int4": Precision("int4", "float32", "float32", logits_atol=0.5, kv_atol=0.5, kept_overlap=0.5,
                      greedy_agreement=0.5, quantize="int4", prepack=True),
}


def get_precision(name: str, flag: str = "--precision") -> Precision:
    """The record for `name`, or a UserError naming the flag and the choices."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise UserError(f"{flag} {name}: choose one of {', '.join(PRECISIONS)}") from None
