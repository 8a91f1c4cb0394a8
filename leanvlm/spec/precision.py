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
    boundaries (pixel values, image features, embeddings, KV cache). torch_dtype: the reference's dtype
    for that precision. Tolerances are checked against the fp32 reference on the same inputs: absolute
    on last-token logits and KV entries, and the fraction of kept indices that must agree (1.0: equal;
    below 1 where near-tied scores may flip at reduced precision)."""

    name: str
    io_dtype: str
    torch_dtype: str
    logits_atol: float
    kv_atol: float
    kept_overlap: float = 1.0
    greedy_agreement: float = 1.0  # fraction of greedy tokens that must equal the reference's (parity)

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}[self.io_dtype]

    def to_dict(self) -> dict:
        return {"name": self.name, "io_dtype": self.io_dtype, "logits_atol": self.logits_atol,
                "kv_atol": self.kv_atol, "kept_overlap": self.kept_overlap,
                "greedy_agreement": self.greedy_agreement}


PRECISIONS: dict[str, Precision] = {
    # fp32 graphs against the fp32 reference: only the order of float additions differs.
    "fp32": Precision("fp32", "float32", "float32", logits_atol=1e-4, kv_atol=1e-4),
}


def get_precision(name: str, flag: str = "--precision") -> Precision:
    """The record for `name`, or a UserError naming the flag and the choices."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise UserError(f"{flag} {name}: choose one of {', '.join(PRECISIONS)}") from None
