"""`leanvlm build --target trt`: TensorRT plans for an engine's graphs, a build record in the manifest, and the
equivalent trtexec command lines.

Flow per graph (Polygraphy's loaders): NetworkFromOnnxPath(strongly_typed=True) -> CreateConfig(profiles,
memory_pool_limits, load_timing_cache, builder_optimization_level) -> EngineBytesFromNetwork(save_timing_cache)
-> plan bytes written here. Strongly typed: every tensor keeps the type the ONNX graph gives it, so fp16/bf16
graphs (whose norms, softmax, reduction scores and logits carry explicit fp32 casts) build as written and int8
graphs build from their Q/DQ nodes; one path for TensorRT 10.3 (JetPack 6) and TensorRT 11 (where strong typing
is the only mode). The serialized plan is written without deserializing it (Polygraphy's EngineFromNetwork +
SaveEngine would hold a second copy of the engine in memory, which on a Jetson is the GPU's memory too).

Layout: plans in `trt/<sm>-trt<version>-<precision>/<graph>.plan`, one directory per GPU architecture,
TensorRT release and precision, so builds for several devices share one engine directory. The build record
(TensorRT version, compute capability, precision, limits, profiles, workspace, build times, sha256 per plan)
goes to the manifest's `artifacts.tensorrt.builds[<dir>]`. A build is staged in a temporary sibling and
renamed into place, then the manifest is replaced atomically: a failed build leaves the directory as it was.

Everything up to the TensorRT calls (`plan_build`, `trtexec_commands`, `check_record`, `select_build`) runs
without TensorRT and is tested here; `run_build` needs TensorRT and a GPU.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from leanvlm.engines import trt_profiles
from leanvlm.engines.trt_targets import PRECISION_TYPES, Target, device_target, plan_dir_name, same_release
from leanvlm.errors import EngineError, UserError
from leanvlm.spec.engine import EngineSpec
from leanvlm.spec.names import GRAPH_NAMES

TRT_DIR = "trt"
BACKEND = "tensorrt"  # key of the build records in the manifest's artifacts
DEFAULT_BUILDER_LEVEL = 3  # TensorRT's own default
TENSORRT_MISSING = ("TensorRT is not installed here: `pip install leanvlm[tensorrt]` on an NVIDIA GPU machine, or "
                    "JetPack's python3-libnvinfer on a Jetson (`leanvlm build --print-trtexec` works without it)")


# ---- device ---------------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, or a UserError saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise UserError(f"{TENSORRT_MISSING} ({e})") from None
    return tensorrt


def compute_capability(device: int = 0) -> tuple[str, str]:
    """(compute capability "8.7", GPU name) of a CUDA device, read from the driver (libcuda) with ctypes: no
    torch or cuda-python needed to build."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise UserError("no NVIDIA driver here (libcuda.so.1 not found): TensorRT plans are built on the GPU they "
                        "run on") from None
    if cuda.cuInit(0) != 0:
        raise UserError("the NVIDIA driver found no usable GPU (cuInit failed)")
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), device) != 0:
        raise UserError(f"no CUDA device {device}")
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    return f"{major.value}.{minor.value}", name.value.decode(errors="replace")


def detect_device() -> Target:
    """This machine's GPU and TensorRT as a Target (needs both)."""
    trt = import_tensorrt()
    sm, name = compute_capability()
    return device_target(trt.__version__, sm, name)


def resolve_target(target: Target | None) -> Target:
    """The device a build runs on. A Jetson target must be the machine running the build: plans are tied to
    the GPU and TensorRT release that built them."""
    device = detect_device()
    if target is not None and (device.sm != target.sm or not same_release(device.tensorrt, target.tensorrt)):
        raise UserError(f"--target {target.name} is SM {target.sm} with TensorRT {target.tensorrt}; this machine "
                        f"is SM {device.sm} ({device.description}) with TensorRT {device.tensorrt}. Plans are built "
                        "on the device they run on: copy a bundle there (`leanvlm bundle`) and build on it")
    return device


# ---- the plan of a build (no TensorRT needed) -------------------------------------------------------
@dataclass
class GraphBuild:
    graph: str
    onnx: Path
    plan: str  # relative to the engine directory
    profiles: list  # [trt_profiles.Profile]


@dataclass
class BuildPlan:
    engine_dir: Path
    target: Target
    precision: str
    dir_name: str
    limits: trt_profiles.ProfileLimits
    workspace_bytes: int | None
    timing_cache: Path
    builder_level: int
    graphs: list[GraphBuild] = field(default_factory=list)

    @property
    def out_rel(self) -> str:
        return f"{TRT_DIR}/{self.dir_name}"


def plan_build(spec: EngineSpec, target: Target, precision: str | None = None, workspace_gib: float | None = None,
               timing_cache: str | Path | None = None, builder_level: int = DEFAULT_BUILDER_LEVEL,
               max_batch: int | None = None, max_prompt: int | None = None, max_new_tokens: int | None = None,
               opt_batch: int | None = None, opt_prompt: int | None = None, lint: bool = True) -> BuildPlan:
    """Validate a build's inputs and derive its profiles and paths. Errors name the flag and the fix."""
    if spec.directory is None:
        raise UserError("a TensorRT build needs an engine directory (made by export-engine)")
    engine_precision = spec.precision.name
    if precision is not None and precision != engine_precision:
        raise UserError(f"--precision {precision}: this engine's graphs are {engine_precision}, and a strongly typed "
                        f"build takes its precision from the graphs; re-export with --precision {precision}")
    if "$" not in target.sm:
        target.check_precision(engine_precision)
    elif PRECISION_TYPES.get(engine_precision) is None:  # a placeholder device (print-trtexec, no GPU)
        raise UserError(f"precision {engine_precision}: TensorRT does not parse this engine's graphs (int4 engines "
                        "use ONNX Runtime's MatMulNBits); export fp32, fp16, bf16 or int8 for TensorRT")
    if engine_precision == "int8":
        calib = (spec.raw.get("export") or {}).get("calibration") or {}
        if calib.get("activations", "asymmetric") != "symmetric":
            raise UserError("this int8 engine has asymmetric uint8 activations (ONNX Runtime's CPU form); TensorRT "
                            "takes symmetric int8 Q/DQ only: re-export with --int8-activations symmetric")
    if isinstance(builder_level, bool) or not isinstance(builder_level, int) or not 0 <= builder_level <= 5:
        raise UserError(f"--builder-level {builder_level}: must be an integer from 0 to 5")
    workspace = None
    if workspace_gib is not None:
        if not (isinstance(workspace_gib, (int, float)) and 0 < workspace_gib <= 1024):
            raise UserError(f"--workspace {workspace_gib}: must be a size in GiB in (0, 1024]")
        workspace = int(workspace_gib * (1 << 30))
    lim = trt_profiles.profile_limits(spec, max_batch, max_prompt, max_new_tokens, opt_batch, opt_prompt)
    profiles = trt_profiles.graph_profiles(spec, lim)
    dir_name = (plan_dir_name(target.sm, target.tensorrt, engine_precision) if "$" not in target.sm
                else f"sm{target.sm}-trt{target.tensorrt}-{engine_precision}")
    cache = Path(timing_cache) if timing_cache else spec.directory / TRT_DIR / f"{dir_name}.timing-cache"
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise UserError(f"--timing-cache {timing_cache}: is a directory; give a file path")
    if lint:
        _lint_for(spec, target)
    graphs = [GraphBuild(g, spec.graph_path(g), f"{TRT_DIR}/{dir_name}/{g}.plan", profiles[g]) for g in GRAPH_NAMES]
    return BuildPlan(spec.directory, target, engine_precision, dir_name, lim, workspace, cache, builder_level, graphs)


def _lint_for(spec: EngineSpec, target: Target) -> None:
    """Refuse graphs the target's ONNX parser would reject, naming every node (by its stable name)."""
    from leanvlm.engines.trt_lint import lint_onnx

    rules = target.parser if "$" not in target.tensorrt else None
    issues = [str(i) for g in GRAPH_NAMES for i in lint_onnx(spec.graph_path(g), rules=rules)]
    if issues:
        raise UserError(f"{len(issues)} node(s) that {rules.label if rules else 'TensorRT'}'s ONNX parser would "
                        f"reject: " + "; ".join(issues[:10]) + (" ..." if len(issues) > 10 else ""))


# ---- trtexec -----------------------------------------------------------------------------------------
def _shape_spec(profile: trt_profiles.Profile, which: int) -> str:
    # trtexec splits specs at ',' and ':'; a name holding either is wrapped in single quotes, which it strips.
    def key(name: str) -> str:
        return f"'{name}'" if any(c in name for c in ",:'") else name

    return ",".join(f"{key(name)}:{'x'.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def trtexec_commands(plan: BuildPlan) -> list[str]:
    """Shell command lines that build the same plans with trtexec (one per graph, after a mkdir)."""
    root = plan.engine_dir
    lines = []
    if "$" in plan.target.sm:
        lines += ["# this machine's GPU and TensorRT were not detected: set them first, e.g.",
                  "#   SM=87 TRT_VERSION=10.3.0  (compute capability without the dot; trtexec --version)",
                  ': "${SM:?set SM}" "${TRT_VERSION:?set TRT_VERSION}"']
    lines.append(f"mkdir -p {_q(root / plan.out_rel)}")
    for gb in plan.graphs:
        args = ["trtexec", f"--onnx={gb.onnx}", f"--saveEngine={root / gb.plan}", "--stronglyTyped"]
        many = len(gb.profiles) > 1
        for i, prof in enumerate(gb.profiles):
            if not prof:
                continue
            if many:
                args.append(f"--profile={i}")
            args += [f"--minShapes={_shape_spec(prof, 0)}", f"--optShapes={_shape_spec(prof, 1)}",
                     f"--maxShapes={_shape_spec(prof, 2)}"]
        args.append(f"--timingCacheFile={plan.timing_cache}")
        if plan.workspace_bytes:
            args.append(f"--memPoolSize=workspace:{plan.workspace_bytes // (1 << 20)}M")
        args += [f"--builderOptimizationLevel={plan.builder_level}", "--skipInference"]
        lines.append(" ".join(_q(a) for a in args))
    return lines


def _q(arg) -> str:
    """shlex.quote, but leaving $VAR references expandable."""
    s = str(arg)
    if "$" in s:
        return '"' + s.replace('"', '\\"') + '"'
    return shlex.quote(s)


# ---- running a build (TensorRT) -----------------------------------------------------------------------
def run_build(plan: BuildPlan, on_step=lambda msg: None) -> dict:
    """Build every graph's plan, then record the build in the manifest; returns the record. Staged in a
    temporary sibling directory: on any failure nothing under trt/ or in the manifest changes."""
    trt = import_tensorrt()
    root = plan.engine_dir
    final = root / plan.out_rel
    stage = root / TRT_DIR / f".tmp-{plan.dir_name}-{os.getpid()}"
    made_trt_dir = not (root / TRT_DIR).exists()
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    cache_stage = stage / "timing.cache"
    if plan.timing_cache.is_file():
        shutil.copyfile(plan.timing_cache, cache_stage)
    record = {"dir": plan.out_rel, "tensorrt": trt.__version__, "compute_capability": plan.target.sm,
              "device": plan.target.description, "precision": plan.precision, "strongly_typed": True,
              "limits": plan.limits.to_dict(), "workspace_bytes": plan.workspace_bytes,
              "builder_optimization_level": plan.builder_level,
              "profiles": trt_profiles.profiles_to_json({gb.graph: gb.profiles for gb in plan.graphs}),
              "graphs": {}, "build_seconds": {}}
    t_all = time.perf_counter()
    try:
        for gb in plan.graphs:
            on_step(f"building {gb.graph} ({len(gb.profiles)} profile(s))")
            t0 = time.perf_counter()
            try:
                data = _build_graph(trt, gb, plan, cache_stage)
            except Exception as e:  # Polygraphy reports parser and builder failures as PolygraphyException
                raise EngineError(f"TensorRT failed to build {gb.graph} ({type(e).__name__}: {e}); its log is "
                                  "above") from e
            if not data:
                raise EngineError(f"TensorRT failed to build {gb.graph} (see its log above)")
            out = stage / f"{gb.graph}.plan"
            with open(out, "wb") as f:
                f.write(memoryview(data))
            del data
            from leanvlm.spec.manifest import sha256_file

            record["graphs"][gb.graph] = {"file": gb.plan, "sha256": sha256_file(out), "bytes": out.stat().st_size,
                                          "onnx": gb.onnx.name}
            record["build_seconds"][gb.graph] = round(time.perf_counter() - t0, 3)
        record["build_seconds"]["total"] = round(time.perf_counter() - t_all, 3)
        record["built_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        on_step(f"recording the build in {root.name}/leanvlm.json")
        _install(stage, final, cache_stage, plan.timing_cache, root, record)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made_trt_dir and not any((root / TRT_DIR).iterdir()):
            (root / TRT_DIR).rmdir()
        raise
    return record


def _build_graph(trt, gb: GraphBuild, plan: BuildPlan, timing_cache: Path):
    """One graph's serialized plan (a buffer), built with Polygraphy's loaders; the timing cache is read from
    and saved to `timing_cache`."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profiles = []
    for prof in gb.profiles:
        p = Profile()
        for name, (lo, opt, hi) in prof.items():
            p.add(name, lo, opt, hi)
        profiles.append(p)
    config = CreateConfig(
        profiles=profiles or None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes} if plan.workspace_bytes else None,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        builder_optimization_level=plan.builder_level)
    network = NetworkFromOnnxPath(str(gb.onnx), strongly_typed=True)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))()


def _install(stage: Path, final: Path, cache_stage: Path, cache: Path, root: Path, record: dict) -> None:
    """Move the staged plans into place and add the record to the manifest; undo the move if the manifest
    cannot be written."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    cache_tmp = None
    if cache_stage.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache_tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        shutil.move(str(cache_stage), cache_tmp)
    stage.rename(final)
    try:
        add_build_record(root, record)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        if old.exists():
            old.rename(final)
        if cache_tmp is not None:
            cache_tmp.unlink(missing_ok=True)
        raise
    if cache_tmp is not None:
        os.replace(cache_tmp, cache)
    shutil.rmtree(old, ignore_errors=True)


# ---- build records -----------------------------------------------------------------------------------------
def add_build_record(engine_dir: Path, record: dict) -> None:
    """Add (or replace) a build record under artifacts.tensorrt.builds and list its plans' checksums, writing
    the manifest atomically. Plans must already be in place."""
    from leanvlm.spec.manifest import read_manifest, replace_manifest

    data = read_manifest(engine_dir, verify_files=False)
    name = Path(record["dir"]).name
    artifacts = data.setdefault("artifacts", {})
    builds = artifacts.setdefault(BACKEND, {}).setdefault("builds", {})
    builds[name] = record
    prefix = f"{record['dir']}/"
    files = {k: v for k, v in data["files"].items() if not k.startswith(prefix)}
    files.update({g["file"]: g["sha256"] for g in record["graphs"].values()})
    data["files"] = files
    replace_manifest(engine_dir, data)


def check_record(record: dict, device: Target, engine_dir: Path | str = "ENGINE_DIR") -> None:
    """Refuse a plan built for another GPU or TensorRT release, before TensorRT is asked to deserialize it
    (a mismatched plan fails there with an opaque error, or worse)."""
    problems = []
    if record.get("compute_capability") != device.sm:
        problems.append(f"built for SM {record.get('compute_capability')}, this GPU is SM {device.sm}")
    if not same_release(str(record.get("tensorrt", "0")), device.tensorrt):
        problems.append(f"built with TensorRT {record.get('tensorrt')}, this machine has {device.tensorrt}")
    if problems:
        raise EngineError(f"{engine_dir}: TensorRT plans in {record.get('dir')} do not fit this device ("
                          + "; ".join(problems) + f"); rebuild on this device: leanvlm build {engine_dir} --target trt")


def select_build(spec: EngineSpec, device: Target) -> dict:
    """The build record of this engine for `device` (its GPU architecture, TensorRT release and the engine's
    precision), checked; an EngineError naming what exists and the rebuild command otherwise."""
    builds = ((spec.artifacts.get(BACKEND) or {}).get("builds") or {})
    where = spec.directory or "ENGINE_DIR"
    if not builds:
        raise EngineError(f"{where}: no TensorRT plans; build them on this device: leanvlm build {where} --target trt")
    name = plan_dir_name(device.sm, device.tensorrt, spec.precision.name)
    record = builds.get(name)
    if record is None:  # same GPU and release under another patch spelling, else the closest for the message
        record = next((r for r in builds.values() if r.get("compute_capability") == device.sm
                       and same_release(str(r.get("tensorrt", "0")), device.tensorrt)
                       and r.get("precision") == spec.precision.name), None)
    if record is None:
        record = next(iter(builds.values()))
        check_record(record, device, where)  # raises: it names the mismatch and the rebuild
        raise EngineError(f"{where}: TensorRT plans exist for {', '.join(builds)} but none for precision "
                          f"{spec.precision.name}; rebuild on this device: leanvlm build {where} --target trt")
    check_record(record, device, where)
    missing = [g for g in GRAPH_NAMES if g not in record.get("graphs", {})]
    if missing:
        raise EngineError(f"{where}: build {record.get('dir')} lacks plans for {', '.join(missing)}; rebuild: "
                          f"leanvlm build {where} --target trt")
    return record
