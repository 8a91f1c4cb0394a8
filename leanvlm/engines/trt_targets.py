"""What each TensorRT target is: GPU architectures, the precisions their tensor cores run, the Jetson
releases (JetPack -> TensorRT / CUDA / SM) and what each TensorRT release's ONNX parser accepts.

The one table of these facts: the build, the bundle, the lint and the backend's plan check read them here.
Sources: NVIDIA's JetPack release notes (6.1/6.2: TensorRT 10.3, CUDA 12.6; 7.2.2+: TensorRT 11.4, CUDA 13),
the TensorRT support matrix (FP8 needs SM 8.9+, FP4 SM 10.0+, BF16 SM 8.0+), onnx-tensorrt's operator
docs (10.0-10.14: opsets 9-20; 10.15 and 11.x: 9-24) and the TopK layer docs (K <= 3840).
"""

from __future__ import annotations

from dataclasses import dataclass

from leanvlm.errors import UserError

# ---- GPU architectures ----------------------------------------------------------------------------
# Data types the tensor cores of an architecture run, in TensorRT's terms.
_TURING = ("fp32", "fp16", "int8")
_AMPERE = (*_TURING, "bf16")
_ADA = (*_AMPERE, "fp8")
_BLACKWELL = (*_ADA, "fp4")


@dataclass(frozen=True)
class GpuArch:
    sm: str  # compute capability, "8.7"
    name: str
    types: tuple[str, ...]


ARCHS: dict[str, GpuArch] = {a.sm: a for a in (
    GpuArch("7.5", "Turing (T4, RTX 20)", _TURING),
    GpuArch("8.0", "Ampere (A100)", _AMPERE),
    GpuArch("8.6", "Ampere (A10, RTX 30)", _AMPERE),
    GpuArch("8.7", "Ampere (Jetson Orin)", _AMPERE),
    GpuArch("8.9", "Ada (L4, L40, RTX 40)", _ADA),
    GpuArch("9.0", "Hopper (H100, H200)", _ADA),
    GpuArch("10.0", "Blackwell (B200)", _BLACKWELL),
    GpuArch("11.0", "Blackwell (Jetson Thor)", _BLACKWELL),
    GpuArch("12.0", "Blackwell (RTX 50, RTX PRO)", _BLACKWELL),
)}

# What each leanvlm --precision needs from TensorRT. int4 engines carry ONNX Runtime's MatMulNBits (a
# com.microsoft contrib op) that TensorRT's parser does not know: they are ONNX Runtime engines only.
PRECISION_TYPES: dict[str, str | None] = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8",
                                          "int4": None}


# ---- ONNX parser rules per TensorRT release --------------------------------------------------------
_BASE_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Conv Cos CumSum Div Einsum Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual Identity If LayerNormalization Less
LessOrEqual Log LogSoftmax MatMul Max Min Mul Neg Not Or Pad Pow Range ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape ScatterElements ScatterND Shape Sigmoid Sign Sin
Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor Gelu Reciprocal Mod IsNaN IsInf
QuantizeLinear DequantizeLinear
""".split())


@dataclass(frozen=True)
class ParserRules:
    """What one TensorRT release's ONNX parser takes (the subset of its matrix our graphs can emit)."""

    label: str  # "TensorRT 10.3"
    max_opset: int
    topk_max_k: int
    ops: frozenset
    # zero points of INT8 Q/DQ: TensorRT's GPU path takes symmetric int8 only (uint8 is DLA-only)
    int8_symmetric_only: bool = True


PARSER_10_3 = ParserRules("TensorRT 10.3", 20, 3840, _BASE_OPS)
# 10.15 and 11.x parse opsets up to 24 and the fused LLM ops opset 23 added.
PARSER_11 = ParserRules("TensorRT 11", 24, 3840,
                        _BASE_OPS | {"RMSNormalization", "RotaryEmbedding", "Attention", "Swish"})


def parser_rules(tensorrt_version: str) -> ParserRules:
    """The parser rules of a TensorRT version string ("10.3.0.30", "11.4")."""
    major, minor = _version_tuple(tensorrt_version)[:2]
    return PARSER_11 if (major, minor) >= (10, 15) else PARSER_10_3


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in str(version).split(".")[:3])
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]") from None
    if not parts:
        raise UserError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    return parts + (0,) * (3 - len(parts))


def same_release(a: str, b: str) -> bool:
    """Whether two TensorRT versions are the same release for plan compatibility: plans are tied to the exact
    MAJOR.MINOR.PATCH (the build number is not part of it)."""
    return _version_tuple(a)[:3] == _version_tuple(b)[:3]


# ---- targets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A device a plan is built for. Jetson targets are fixed by their JetPack; `trt` is the GPU of the
    machine running the build (its facts are detected)."""

    name: str
    description: str
    sm: str
    tensorrt: str
    cuda: str
    jetpack: str | None = None
    unified_memory: bool = False
    min_memory_gib: int = 0  # smallest module of the family; the bundle's workspace cap fits it
    workspace_gib: float = 0.0  # default memory-pool cap of the bundle's build script (0: TensorRT's default)
    python: str = ""  # the device's Python, for pinned wheels

    @property
    def arch(self) -> GpuArch:
        return ARCHS[self.sm]

    @property
    def parser(self) -> ParserRules:
        return parser_rules(self.tensorrt)

    def precisions(self) -> list[str]:
        """The leanvlm precisions whose graphs TensorRT builds on this target's GPU."""
        return [p for p, t in PRECISION_TYPES.items() if t is not None and t in self.arch.types]

    def check_precision(self, precision: str) -> None:
        """Refuse a precision this target cannot run, naming the target and what it can."""
        allowed = self.precisions()
        if precision not in allowed:
            why = ("int4 engines use ONNX Runtime's MatMulNBits, which TensorRT does not parse"
                   if PRECISION_TYPES.get(precision, "x") is None else
                   f"SM {self.sm} ({self.arch.name}) has no {precision} tensor cores" if precision in PRECISION_TYPES
                   else f"unknown precision {precision!r}")
            raise UserError(f"target {self.name}: precision {precision} is not buildable ({why}); this target "
                            f"builds {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return {"name": self.name, "sm": self.sm, "tensorrt": self.tensorrt, "cuda": self.cuda,
                "jetpack": self.jetpack}


JETSON_TARGETS: dict[str, Target] = {t.name: t for t in (
    # JetPack 6.1/6.2 (L4T r36.4): every Orin module, Nano 8 GB up to AGX 64 GB, memory shared CPU/GPU.
    Target("jetson-orin-jp6", "Jetson Orin (Nano/NX/AGX), JetPack 6.1/6.2", sm="8.7", tensorrt="10.3", cuda="12.6",
           jetpack="6.2", unified_memory=True, min_memory_gib=8, workspace_gib=1.0, python="3.10"),
    # JetPack 7.2.2+ (L4T r38): Thor's Blackwell GPU is SM 11.0 under CUDA 13 (10.1 under CUDA 12.8).
    Target("jetson-thor-jp7", "Jetson AGX Thor, JetPack 7.2.2+", sm="11.0", tensorrt="11.4", cuda="13.0",
           jetpack="7.2.2", unified_memory=True, min_memory_gib=64, workspace_gib=4.0, python="3.12"),
)}
TARGET_NAMES = ("trt", *JETSON_TARGETS)


def get_target(name: str, flag: str = "--target") -> Target | None:
    """The Jetson target called `name`, None for `trt` (this machine's GPU), or a UserError naming the choices."""
    if name == "trt":
        return None
    try:
        return JETSON_TARGETS[name]
    except (KeyError, TypeError):
        raise UserError(f"{flag} {name}: choose one of {', '.join(TARGET_NAMES)}") from None


def device_target(tensorrt_version: str, sm: str, name: str = "this GPU") -> Target:
    """A Target for a detected device (TensorRT version and compute capability); unknown architectures are
    refused rather than guessed."""
    if sm not in ARCHS:
        raise UserError(f"{name}: compute capability {sm} is not in leanvlm's architecture table "
                        f"({', '.join(ARCHS)}); add it to leanvlm/engines/trt_targets.py")
    jetson = next((t for t in JETSON_TARGETS.values() if t.sm == sm), None)
    return Target("trt", name, sm=sm, tensorrt=tensorrt_version, cuda="", unified_memory=jetson is not None)


def plan_dir_name(sm: str, tensorrt_version: str, precision: str) -> str:
    """`sm87-trt10.3.0-fp16`: the directory under trt/ a build writes (one per GPU, TensorRT release and
    precision, so builds for several devices live side by side)."""
    return f"sm{sm.replace('.', '')}-trt{'.'.join(map(str, _version_tuple(tensorrt_version)))}-{precision}"
