"""`export-engine`: checkpoint + schedule + precision -> engine directory (four ONNX graphs sharing one
weights file, tokenizer/processor, manifest).

Everything is written to a temporary sibling of the output directory and moved into place only once
every graph has passed an ONNX Runtime run against the fp32 reference, onnx.checker and the TensorRT lint.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from leanvlm.errors import UserError
from leanvlm.spec import defaults
from leanvlm.spec.manifest import MANIFEST_NAME, config_hash, write_manifest
from leanvlm.spec.names import GRAPH_NAMES

DISK_MARGIN = 64 << 20  # graphs, tokenizer and manifest beside the weights


@dataclass
class ExportOptions:
    """Everything `export-engine` takes. Limits bound the runtime's shapes and KV-cache capacity."""

    model: str
    keep: float | None = None  # fraction of image tokens reaching the last stage; None with a schedule file
    layer: int = defaults.FASTV_LAYER  # FastV's layer K
    method: str = "fastv"  # a preset of reduction.schedule.METHODS
    schedule: Path | None = None  # a YAML/JSON schedule file instead of a preset
    out: Path | None = None
    opset: int = defaults.OPSET
    max_batch: int = defaults.MAX_BATCH
    max_prompt: int | None = None  # tokens including image tokens; default: image tokens + PROMPT_TEXT_TOKENS
    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    force: bool = False
    exporter: str = defaults.EXPORTER
    precision: str = defaults.PRECISION  # a key of spec.precision.PRECISIONS
    calib_data: str | None = None  # int8: "shapes" or a JSONL file of requests ({"image", "question", ...})
    calib_n: int = defaults.CALIB_N
    int8_activations: str = "asymmetric"  # int8: "symmetric" for TensorRT (see export.quantize)
    check_batch: tuple[int, ...] = (5, 12, 9)  # text lengths of the ONNX Runtime check (ragged, batch 3)
    static_cap: bool = False  # adaptive stages: always K = cap (masking only) for static-shape targets


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    graph_bytes: dict[str, int]  # bytes of weights each graph references (shared ones counted in each)
    seconds: float
    flops_ratio: float
    checks: list = field(default_factory=list)
    lint: list = field(default_factory=list)
    weights_file_bytes: int = 0  # the shared weights file: every distinct tensor once


def validate_options(opts: ExportOptions) -> Path:
    """Check everything that needs no model; returns the output directory. Raises UserError."""
    from leanvlm.export.onnx_export import EXPORTERS, SUPPORTED_OPSETS

    if opts.schedule is not None:
        if opts.keep is not None:
            raise UserError("--keep and --schedule exclude each other: a schedule file sets every stage's keep")
        if not Path(opts.schedule).is_file():
            raise UserError(f"--schedule {opts.schedule}: no such file")
    elif opts.keep is None and opts.method != "adaptive":
        raise UserError("--keep is required (or give a --schedule file)")
    elif opts.keep is None:
        pass  # adaptive: the caps of the trained ATP record
    elif isinstance(opts.keep, bool) or not isinstance(opts.keep, (int, float)) or not 0.0 < opts.keep <= 1.0:
        raise UserError(f"--keep {opts.keep}: must be in (0, 1] (the fraction of image tokens kept)")
    from leanvlm.reduction.schedule import METHODS

    if opts.method not in METHODS:
        raise UserError(f"--method {opts.method}: choose one of {', '.join(METHODS)}")
    if opts.opset not in SUPPORTED_OPSETS:
        raise UserError(f"--opset {opts.opset}: use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                        "(TensorRT 10.3 parses up to 20; 23 adds fused ops it rejects)")
    if opts.exporter not in EXPORTERS:
        raise UserError(f"--exporter {opts.exporter}: choose one of {', '.join(EXPORTERS)}")
    from leanvlm.engines.onnxruntime import unsupported_dtype
    from leanvlm.spec.precision import get_precision

    precision = get_precision(opts.precision)
    reason = unsupported_dtype(precision.io_dtype)
    if reason:
        raise UserError(f"--precision {opts.precision}: the exported graphs could not be verified here: {reason}; "
                        "export where onnxruntime has these kernels (e.g. its CUDA build) or choose fp16")
    if precision.quantize == "int8" and opts.calib_data is None:
        raise UserError("--precision int8 needs --calib-data shapes|FILE.jsonl: the requests whose activation "
                        "ranges set the 8-bit scales")
    if precision.quantize != "int8" and opts.calib_data is not None:
        raise UserError(f"--calib-data is used by --precision int8 only (not {opts.precision})")
    from leanvlm.export.quantize import INT8_ACTIVATIONS

    if opts.int8_activations not in INT8_ACTIVATIONS:
        raise UserError(f"--int8-activations {opts.int8_activations}: choose one of {', '.join(INT8_ACTIVATIONS)}")
    for flag, value, top in (("--max-batch", opts.max_batch, 4096), ("--max-new-tokens", opts.max_new_tokens, 1 << 20)):
        if not isinstance(value, int) or not 1 <= value <= top:
            raise UserError(f"{flag} {value}: must be an integer in [1, {top}]")
    if opts.max_prompt is not None and (not isinstance(opts.max_prompt, int) or opts.max_prompt < 1):
        raise UserError(f"--max-prompt {opts.max_prompt}: must be a positive integer")
    out = Path(opts.out if opts.out is not None else Path("out") / _slug(opts.model, opts.keep)).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise UserError(f"--out {out}: exists and is not empty; pass --force to replace it or choose another directory")
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    try:  # a real write: permission bits say nothing for root, nor for read-only or virtual filesystems
        Path(tempfile.mkdtemp(prefix=".leanvlm-probe-", dir=parent)).rmdir()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write to {parent} ({e.strerror}); choose a writable directory") from e
    return out


def export_engine(opts: ExportOptions, on_step: Callable[[str], None] | None = None) -> ExportResult:
    """Export `opts.model` with its reduction schedule at `opts.precision` to an engine directory; see the
    module docstring. `on_step` receives a line per step (the CLI's progress)."""
    import torch
    from transformers import LlavaConfig

    from leanvlm.engines.onnxruntime import create_session
    from leanvlm.engines.trt_lint import lint_onnx
    from leanvlm.export.onnx_export import graph_io
    from leanvlm.export.quantize import calibration_items, capture_feeds, quantize_engine
    from leanvlm.export.verify import compare_cases, reference_cases
    from leanvlm.export.weights import WeightStore
    from leanvlm.models import load_model, resolve_model
    from leanvlm.reduction.flops import prefill_flops_ratio
    from leanvlm.reference import ReducedLlava
    from leanvlm.runtime.processor import VLMProcessor
    from leanvlm.spec.engine import EngineSpec, Limits
    from leanvlm.spec.precision import PRECISIONS, get_precision

    step = on_step or (lambda _msg: None)
    t0 = time.perf_counter()
    out = validate_options(opts)
    precision = get_precision(opts.precision)
    calib = calibration_items(opts.calib_data, opts.calib_n) if precision.quantize == "int8" else None
    step(f"resolving {opts.model}")
    cfg = LlavaConfig.from_pretrained(resolve_model(opts.model))
    text = cfg.text_config
    # The schedule (and its errors) needs only the config: fail before loading weights.
    schedule = resolve_schedule(cfg, opts.method, opts.keep, opts.layer, opts.schedule, resolve_model(opts.model),
                                opts.static_cap)
    if opts.exporter == "dynamo" and any(st.adaptive and not st.static for st in schedule.stages):
        raise UserError("--exporter dynamo: an adaptive stage's data-dependent TopK K is exported with the "
                        "torchscript exporter only; use --exporter torchscript or --static-cap")
    n_img = schedule.llm_image_tokens  # image tokens in the LLM prompt
    max_prompt = opts.max_prompt or n_img + defaults.PROMPT_TEXT_TOKENS
    if max_prompt <= n_img:
        raise UserError(f"--max-prompt {max_prompt}: must exceed the {n_img} image tokens of this model")
    if max_prompt + opts.max_new_tokens > text.max_position_embeddings:
        raise UserError(f"--max-prompt {max_prompt} + --max-new-tokens {opts.max_new_tokens} exceeds the model's "
                        f"{text.max_position_embeddings} positions")
    step(f"loading {opts.model} ({precision.torch_dtype})")
    loaded = load_model(opts.model, dtype=getattr(torch, precision.torch_dtype))
    model = loaded.model
    ref = ReducedLlava(model, schedule).eval()

    created = [p for p in [out.parent.absolute(), *out.parent.absolute().parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        check_disk(tmp, sum(p.numel() * p.element_size() for p in model.parameters()))
        spec = EngineSpec.build(cfg, schedule, Limits(opts.max_batch, max_prompt, opts.max_new_tokens),
                                opts.precision, {"model": loaded.source, "path": str(loaded.path),
                                                 "config_sha256": config_hash(model.config.to_dict())})
        store = WeightStore(tmp)
        try:
            weight_bytes = _export_graphs(ref, tmp, store, opts, step)
        finally:
            store.close()
        step("computing the PyTorch reference outputs")
        cases = reference_cases(ref, list(opts.check_batch[: opts.max_batch]))
        loaded.model = None  # the sessions below map the written weights: one copy in memory at a time
        del ref, model
        gc.collect()
        step("running graphs in ONNX Runtime against the PyTorch reference")
        session = lambda g: create_session(tmp / f"{g}.onnx", ["CPUExecutionProvider"],  # noqa: E731
                                           low_memory=precision.half)
        checks = compare_cases(cases, session, PRECISIONS["fp32"] if precision.quantize else precision)
        if precision.quantize:
            feeds = None
            if calib is not None:
                step(f"calibrating on {len(calib)} requests ({opts.calib_data})")
                graphs = {g: graph_io(tmp / f"{g}.onnx") for g in GRAPH_NAMES}
                feeds = capture_feeds(replace(spec, directory=tmp, graphs=graphs, precision=PRECISIONS["fp32"]),
                                      VLMProcessor.from_hf(loaded.processor), calib, opts.max_batch)
            step(f"quantizing to {precision.quantize}")
            weight_bytes = quantize_engine(tmp, precision.quantize, feeds, opts.int8_activations)
            del feeds
            step(f"running the {precision.quantize} graphs against the PyTorch reference")
            checks = compare_cases(cases, session, precision)
        del cases
        step("checking graphs (onnx.checker, TensorRT lint)")
        import onnx

        lint = []
        for g in GRAPH_NAMES:
            onnx.checker.check_model(str(tmp / f"{g}.onnx"), full_check=True)
            lint += [str(i) for i in lint_onnx(tmp / f"{g}.onnx")]
        step("saving tokenizer and processor")
        loaded.processor.save_pretrained(tmp)
        graphs = {g: graph_io(tmp / f"{g}.onnx") for g in GRAPH_NAMES}
        flops = prefill_flops_ratio(schedule, defaults.FLOPS_TEXT_TOKENS, text.hidden_size, text.intermediate_size,
                                    text.num_key_value_heads / text.num_attention_heads)
        body = _manifest_body(opts, spec, graphs, flops, lint, checks, store, weight_bytes)
        write_manifest(tmp, body)
        tmp.chmod(0o755)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents this export made, innermost first: leave nothing behind
            try:
                p.rmdir()
            except OSError:
                break
        raise
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return ExportResult(out, manifest, weight_bytes, time.perf_counter() - t0, flops, checks, lint,
                        weights_file_bytes=(out / store.name).stat().st_size)


def _export_graphs(ref, tmp: Path, store, opts: ExportOptions, step) -> dict[str, int]:
    """Trace every graph into `tmp`, weights into `store`. A function of its own so that no graph spec (which
    holds the model) outlives it: the caller frees the model before opening sessions."""
    from leanvlm.export.graphs import build_specs
    from leanvlm.export.onnx_export import export_graph

    weight_bytes = {}
    for g in build_specs(ref):
        step(f"exporting {g.name}.onnx")
        weight_bytes[g.name] = export_graph(g, tmp / f"{g.name}.onnx", store, opts.opset, opts.exporter)
    return weight_bytes


def resolve_schedule(cfg, method: str, keep: float | None, layer: int, schedule_file: Path | None,
                     model_dir: Path | None = None, static_cap: bool = False):
    """The schedule of a preset or a file for a LLaVA config (validated; raises UserError). `--method adaptive`
    reads its stages from the ATP record in `model_dir`; `static_cap` makes every adaptive stage run K = cap."""
    from leanvlm.reduction.schedule import Schedule
    from leanvlm.models.llava_config import num_image_tokens, vision_layers_used

    layers, n, vit = cfg.text_config.num_hidden_layers, num_image_tokens(cfg), vision_layers_used(cfg)
    if schedule_file is not None:
        schedule = Schedule.from_file(schedule_file, layers, n, vit)
    elif method == "adaptive":
        from leanvlm.reduction.atp import adaptive_schedule

        if model_dir is None:
            raise UserError("--method adaptive needs the model's directory (its trained ATP modules)")
        schedule = adaptive_schedule(model_dir, layers, n, None if keep == 1.0 else keep)
    else:
        schedule = Schedule.preset(method, layers, n, keep, layer, vit)
    if static_cap:
        if not any(st.adaptive for st in schedule.stages):
            raise UserError("--static-cap applies to adaptive stages; this schedule has none")
        schedule = replace(schedule, stages=tuple(replace(st, static=True) if st.adaptive else st
                                                  for st in schedule.stages))
    return schedule


def check_disk(directory: Path, weight_bytes: int) -> None:
    """Refuse to start an export the disk cannot hold: the weights are written once, plus a margin."""
    free = shutil.disk_usage(directory).free
    need = weight_bytes + DISK_MARGIN
    if free < need:
        raise UserError(f"not enough disk space at {directory.parent}: the engine needs about "
                        f"{need / 2**30:.1f} GiB ({weight_bytes / 2**30:.1f} GiB of weights), "
                        f"{free / 2**30:.1f} GiB are free; free space or choose another --out")


def _manifest_body(opts, spec, graphs, flops, lint, checks, store, weight_bytes) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from leanvlm import __version__

    return {
        **spec.manifest_sections(),
        "schedule": {**spec.schedule.to_dict(), "keep": opts.keep, "prefill_flops_ratio": flops,
                     "flops_text_tokens": defaults.FLOPS_TEXT_TOKENS},
        "graphs": graphs,
        "artifacts": {"onnxruntime": {"graphs": {g: io["file"] for g, io in graphs.items()}}},
        "export": {"exporter": opts.exporter, "opset": opts.opset, "weights_file": store.name,
                   "weights_file_bytes": store.path.stat().st_size,
                   "graph_weight_bytes": weight_bytes,
                   "calibration": {"data": str(opts.calib_data), "n": opts.calib_n,
                                   "activations": opts.int8_activations} if opts.calib_data else None,
                   "trt_lint": lint, "check": {c.graph: c.worst for c in checks}},
        "versions": {"leanvlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished directory in; an existing one (--force) is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor of `path`: where the temporary sibling and the final rename happen."""
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def _slug(model: str, keep: float | None) -> str:
    name = Path(model).name or "model"
    return f"{name}-keep{keep:g}" if keep is not None else f"{name}-schedule"
