"""Command-line entry points. Thin: parse, call the library, print. Bad input -> one line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanvlm.errors import EngineError, UserError
from leanvlm.reduction.schedule import METHODS
from leanvlm.runtime.backends.base import backend_names
from leanvlm.spec import defaults
from leanvlm.models.loading import BUILTIN_MODELS
from leanvlm.models.tiny import PRESETS, SAVE_DTYPES
from leanvlm.spec.precision import PRECISIONS


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage stays available through --help)."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _run(fn, *args) -> int:
    try:
        return fn(*args) or 0
    except (UserError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---- export-engine ---------------------------------------------------------------------------
def _export_parser(prog: str = "export-engine") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Export a LLaVA checkpoint with visual-token reduction baked into ONNX graphs.")
    p.add_argument("--model", required=True,
                   help="alias (llava-7b, llava-13b), built-in model (" + ", ".join(BUILTIN_MODELS) + "), Hugging "
                        "Face repo id, or local checkpoint directory")
    p.add_argument("--keep", type=float, help="fraction of image tokens that reach the last stage, in (0, 1]; "
                   "1 = unreduced (required unless --schedule)")
    p.add_argument("--method", choices=METHODS, default=defaults.METHOD,
                   help=f"reduction preset (default {defaults.METHOD}): fastv = one drop at --layer; pdrop = PyramidDrop, drops at "
                        "1/4, 1/2, 3/4 depth keeping keep^(1/3), keep^(2/3), keep; illava = merges in four middle "
                        "ViT layers and one LLM layer; visionzip = dominant + contextual tokens before the LLM; "
                        "adaptive = per-sample counts from the model's trained ATP modules (--keep, optional, "
                        "sets their cap)")
    p.add_argument("--layer", type=int, default=defaults.FASTV_LAYER, help="fastv: decoder layer K at whose input "
                   f"tokens are dropped (default {defaults.FASTV_LAYER})")
    p.add_argument("--schedule", type=Path, help="YAML/JSON schedule file instead of --method/--keep")
    p.add_argument("--out", type=Path, help="output directory (default out/<model>-keep<R>)")
    p.add_argument("--opset", type=int, default=defaults.OPSET,
                   help=f"ONNX opset (default {defaults.OPSET}; TensorRT 10.3 parses up to 20)")
    p.add_argument("--max-batch", type=int, default=defaults.MAX_BATCH,
                   help=f"largest batch the runtime accepts (default {defaults.MAX_BATCH})")
    p.add_argument("--max-prompt", type=int, help="longest prompt in tokens, image tokens included "
                   "(default image tokens + 512)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.MAX_NEW_TOKENS,
                   help=f"most tokens generated per request (default {defaults.MAX_NEW_TOKENS})")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=defaults.PRECISION,
                   help=f"default {defaults.PRECISION}; fp16/bf16: half-precision graphs with norms, softmax, "
                        "reduction scores and logits in fp32; int8: static Q/DQ (needs --calib-data); int4: "
                        "4-bit decoder weights (ONNX Runtime MatMulNBits)")
    p.add_argument("--calib-data", help="int8: 'shapes' (the shapes task's training split) or a JSONL file "
                   "({image, question} per line) whose requests calibrate the activation ranges")
    p.add_argument("--calib-n", type=int, default=defaults.CALIB_N,
                   help=f"int8: calibration requests (default {defaults.CALIB_N})")
    p.add_argument("--int8-activations", choices=("asymmetric", "symmetric"), default="asymmetric",
                   help="int8: asymmetric uint8 activations (default; what ONNX Runtime's x86 kernels fuse) or "
                        "symmetric int8 (what TensorRT's INT8 path takes)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default=defaults.EXPORTER,
                   help="torch.onnx exporter (default torchscript: much faster to export, same graphs)")
    p.add_argument("--static-cap", action="store_true",
                   help="adaptive stages: always run K = cap tokens (per-sample masking only) for targets that need "
                        "static shapes, instead of K = the batch's largest count")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def _export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from leanvlm.export import ExportOptions, export_engine

    _quiet_transformers()
    console = Console(stderr=True, log_path=False)
    opts = ExportOptions(model=args.model, keep=args.keep, layer=args.layer, method=args.method,
                         schedule=args.schedule, out=args.out, opset=args.opset,
                         max_batch=args.max_batch, max_prompt=args.max_prompt, max_new_tokens=args.max_new_tokens,
                         force=args.force, exporter=args.exporter, precision=args.precision,
                         calib_data=args.calib_data, calib_n=args.calib_n, int8_activations=args.int8_activations,
                         static_cap=args.static_cap)
    with console.status("exporting") as status:
        def on_step(msg: str) -> None:
            console.log(msg)
            status.update(msg)

        result = export_engine(opts, on_step)
    _print_export_summary(result)
    return 0


def _quiet_transformers() -> None:
    """transformers' own per-shard progress bars would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _print_export_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result.manifest
    table = Table(title=f"engine written to {result.out} ({_human(result.weights_file_bytes)} of weights in "
                        f"{m['export']['weights_file']}, shared by the graphs)")
    table.add_column("graph")
    table.add_column("weights it uses", justify="right")
    table.add_column("max |diff| vs PyTorch", justify="right")
    for g, size in result.graph_bytes.items():
        table.add_row(f"{g}.onnx", _human(size), f"{m['export']['check'][g]:.2e}")
    stages = Table(title="image tokens per stage")
    stages.add_column("where")
    stages.add_column("image tokens", justify="right")
    n = m["model"].get("num_patch_tokens", m["model"]["num_image_tokens"])
    for v in m["schedule"].get("vision_stages", []):
        at = f"ViT layer {v['layer']} ({v['kind']})" if v["kind"] == "vit_merge" else "encoder output (visionzip)"
        stages.add_row(at, f"{n} -> {v['num_keep']}")
    adaptive = {st["layer"]: st for st in m["schedule"].get("stages", []) if st.get("kind") == "adaptive"}
    for grp in m["cache_groups"]:
        a, b = grp["layers"]
        st = adaptive.get(a)
        count = f"{st['min_keep']}..{grp['image_tokens']} per request" if st else grp["image_tokens"]
        stages.add_row(f"LLM layers {a}-{b - 1}" if b - a > 1 else f"LLM layer {a}", f"{n} -> {count}")
    console = Console()
    console.print(table)
    console.print(stages)
    console.print(f"theoretical prefill FLOPs vs unreduced: {result.flops_ratio:.3f} "
                  f"({m['schedule']['flops_text_tokens']} text tokens)   export time: {result.seconds:.1f} s")
    if result.lint:
        console.print(f"[yellow]TensorRT lint: {len(result.lint)} issue(s)[/yellow]: " + "; ".join(result.lint[:5]))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def export_engine_main(argv: list[str] | None = None) -> int:
    """Console script `export-engine`."""
    args = _export_parser().parse_args(argv)
    return _run(_export, args)


# ---- leanvlm ---------------------------------------------------------------------------------
def _make_tiny(args: argparse.Namespace) -> int:
    from leanvlm.models import make_tiny

    overrides = {"text_layers": args.layers} if args.layers is not None else {}
    path = make_tiny(args.out, seed=args.seed, preset=args.preset, dtype=args.dtype, **overrides)
    print(f"tiny LLaVA checkpoint written to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    from leanvlm.runtime import Pipeline

    _quiet_transformers()
    if len(args.image) != len(args.prompt):
        raise UserError(f"got {len(args.image)} --image and {len(args.prompt)} --prompt; give them in pairs")
    if args.stream and len(args.prompt) > 1:
        raise UserError("--stream takes one --image/--prompt pair")
    pipe = Pipeline.load(args.engine, backend=args.backend)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    if args.stream:
        for piece in pipe.stream(args.image[0], args.prompt[0], **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    results = pipe.generate(images=args.image, prompts=args.prompt, **sampling)
    for res in results:
        if args.json:
            print(json.dumps(res.to_dict()))
        else:
            print(res.text)
    return 0


def _parity(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from leanvlm.runtime.parity import run_parity

    _quiet_transformers()
    report = run_parity(args.engine, samples=args.samples, steps=args.steps, atol=args.atol, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        t = Table(title=f"parity: {args.engine} (onnxruntime, {report.precision}) vs fp32 PyTorch reference, "
                        f"{report.samples} samples")
        t.add_column("check")
        t.add_column("value", justify="right")
        t.add_column("ok")
        mark = lambda ok: "[green]yes[/green]" if ok else "[red]NO[/red]"  # noqa: E731
        t.add_row("last-token logits max |diff|", f"{report.logits_max_abs:.2e}", mark(report.logits_max_abs <= report.atol))
        t.add_row("last-token logits max rel diff", f"{report.logits_max_rel:.2e}", "")
        t.add_row("Polygraphy prefill comparison", "", mark(report.polygraphy_passed))
        t.add_row("kept-index sets equal", f"{report.kept_agreement:.1%}", "")
        t.add_row(f"kept-index overlap (worst row; needs {report.kept_overlap_required:.0%})",
                  f"{report.kept_overlap:.1%}", mark(report.kept_overlap >= report.kept_overlap_required))
        t.add_row(f"greedy-token agreement ({report.steps} steps; needs {report.greedy_required:.0%})",
                  f"{report.greedy_agreement:.1%}", mark(report.greedy_agreement >= report.greedy_required))
        red = report.reduced_vs_unreduced
        if red:
            t.add_row("reduced vs unreduced: greedy agreement", f"{red['greedy_agreement']:.1%}", "")
            t.add_row("reduced vs unreduced: first-token logit KL", f"{red['logit_kl_mean']:.3g} (max "
                      f"{red['logit_kl_max']:.3g})", "")
        Console().print(t)
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from leanvlm.runtime.bench import bench_engine, compare

    kw = dict(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
              warmup=args.warmup)
    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    console = Console(stderr=True, log_path=False)
    console.log(f"benchmarking {args.engine} ({args.backend})")
    report = {"engine": bench_engine(args.engine, backend=args.backend, **kw)}
    if args.baseline:
        console.log(f"benchmarking baseline {args.baseline} ({args.baseline_backend or args.backend})")
        report["baseline"] = bench_engine(args.baseline, backend=args.baseline_backend or args.backend, **kw)
        report["ratios"] = compare(report["engine"], report["baseline"])
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = Table(title=f"batch {args.batch}, {report['engine']['prompt_tokens']} prompt tokens "
                    f"({report['engine']['image_tokens']} image), {args.new_tokens} new tokens, "
                    f"median \\[p25-p75] of {args.repeats}")
    t.add_column("metric")
    cols = [k for k in ("engine", "baseline") if k in report]
    for k in cols:
        t.add_column(f"{k}: {Path(report[k]['engine']).name} ({report[k]['backend']})", justify="right")
    ms = lambda s: f"{s['median'] * 1e3:.1f} ms [{s['p25'] * 1e3:.1f}-{s['p75'] * 1e3:.1f}]"  # noqa: E731
    t.add_row("prefill latency", *[ms(report[k]["prefill_s"]) for k in cols])
    t.add_row("time to first token", *[ms(report[k]["ttft_s"]) for k in cols])
    t.add_row("decode tokens/s", *[f"{report[k]['decode_tokens_per_s']['median']:.1f}" for k in cols])
    t.add_row("peak memory (PSS: anon + mapped)", *[
        f"{_human(m['total'])} ({_human(m['anon'])} + {_human(m['file'])})"
        for m in (report[k]["peak_memory_bytes"] for k in cols)])
    t.add_row("peak RSS (maps counted per session)", *[_human(report[k]["peak_rss_bytes"]) for k in cols])
    t.add_row("KV cache (used)", *[_human(report[k]["kv_cache"]["used_bytes"]) for k in cols])
    t.add_row("theoretical prefill FLOPs vs unreduced",
              *[f"{report[k]['theoretical_prefill_flops_ratio']:.3f}" for k in cols])
    Console().print(t)
    if "ratios" in report:
        r = report["ratios"]
        Console().print(f"prefill speed-up {r['prefill_speedup']:.2f}x (theoretical {r['theoretical_prefill_speedup']:.2f}x,"
                        f" {r['fraction_of_theoretical']:.0%} of it); TTFT {r['ttft_speedup']:.2f}x; decode tokens/s "
                        f"{r['decode_tokens_per_s_ratio']:.2f}x; KV bytes {r['kv_bytes_ratio']:.2f}x")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from leanvlm.export.engine import resolve_schedule
    from leanvlm.models.loading import load_config
    from leanvlm.reduction.plan import make_plan
    from leanvlm.models.llava_config import num_image_tokens

    if args.text_tokens < 1:
        raise UserError(f"--text-tokens {args.text_tokens}: must be >= 1")
    cfg = load_config(args.model)
    n_img = num_image_tokens(cfg)
    if args.schedule and args.keep is not None:
        raise UserError("--keep and --schedule exclude each other: a schedule file sets every stage's keep")
    from leanvlm.models.loading import resolve_model

    adaptive_method = args.method == "adaptive" and not args.schedule
    model_dir = resolve_model(args.model) if adaptive_method else None  # only adaptive reads more than the config
    keep = None if args.keep is None and adaptive_method else 1.0 if args.keep is None else args.keep
    schedule = resolve_schedule(cfg, args.method, keep, args.layer, args.schedule, model_dir)
    plan = make_plan(cfg, schedule, args.text_tokens, args.kv_dtype_bytes)
    adaptive = None
    if any(st.adaptive for st in schedule.stages):
        from leanvlm.reduction.atp import read_record
        from leanvlm.reduction.plan import adaptive_summary

        adaptive = adaptive_summary(cfg, schedule, read_record(model_dir or resolve_model(args.model)),
                                    args.text_tokens)
    if args.json:
        print(json.dumps({"schedule": schedule.to_dict(), **plan.to_dict(),
                          **({"adaptive": adaptive} if adaptive else {})}, indent=2))
        return 0
    t = Table(title=f"{args.model}: {schedule.method}, {args.text_tokens} text tokens")
    t.add_column("part")
    t.add_column("layers", justify="right")
    t.add_column("image tokens", justify="right")
    t.add_column("tokens per layer", justify="right")
    vt = plan.vision_tokens_per_layer
    for a in range(len(vt)):
        if a == 0 or vt[a] != vt[a - 1]:
            b = next((j for j in range(a, len(vt)) if vt[j] != vt[a]), len(vt))
            t.add_row("vision encoder", f"{a}-{b - 1}" if b - a > 1 else str(a), f"{n_img} -> {vt[a] - 1}",
                      f"{vt[a]} (+CLS)")
    for a, b, n in schedule.groups:
        t.add_row("LLM decoder", f"{a}-{b - 1}" if b - a > 1 else str(a), f"{n_img} -> {n}", str(args.text_tokens + n))
    Console().print(t)
    Console().print(f"theoretical FLOPs vs unreduced: vision encoder {plan.vision_flops_ratio:.3f}, prefill "
                    f"{plan.prefill_flops_ratio:.3f} ({plan.prefill_flops / 1e9:.2f} vs "
                    f"{plan.prefill_flops_unreduced / 1e9:.2f} GFLOPs); prompt KV cache {_human(plan.kv_bytes)} vs "
                    f"{_human(plan.kv_bytes_unreduced)} ({plan.kv_ratio:.3f}) at {args.kv_dtype_bytes} bytes per value")
    if adaptive:
        for st in adaptive["stages"]:
            mean = st["measured_mean_kept"]
            Console().print(f"adaptive stage at layer {st['layer']}: cap {st['cap']} (the numbers above), min "
                            f"{st['min']}, spatial {st['spatial']}{', static K = cap' if st['static'] else ''}; "
                            f"measured mean {'n/a' if mean is None else f'{mean:.1f}'} tokens per request "
                            f"({adaptive['measured']['data']})")
        Console().print(f"prefill FLOPs vs unreduced at the measured mean: "
                        f"{adaptive['prefill_flops_ratio_at_measured_mean']:.3f}")
    return 0


def _viz(args: argparse.Namespace) -> int:
    from leanvlm.runtime import Pipeline
    from leanvlm.runtime.viz import render

    _quiet_transformers()
    path = render(Pipeline.load(args.engine, backend=args.backend), args.image, args.prompt, args.out)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from leanvlm.eval.harness import evaluate, load_jsonl, shapes_items
    from leanvlm.runtime import Pipeline

    _quiet_transformers()
    if (args.task is None) == (args.data is None):
        raise UserError("give --task shapes or --data FILE.jsonl")
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch {args.batch}: must be >= 1")
    items = shapes_items(args.n, args.seed) if args.task else load_jsonl(args.data)
    pipe = Pipeline.load(args.engine, backend=args.backend)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("evaluating", total=len(items))
        report = evaluate(pipe, items, args.batch, on_batch=lambda done, _total: progress.update(task, completed=done))
    if args.json:
        print(json.dumps(report.to_dict(args.predictions), indent=2))
        return 0
    t = Table(title=f"{args.engine}: {args.task or args.data}, {report.n} samples, {report.seconds:.1f} s")
    t.add_column("question type")
    t.add_column("n", justify="right")
    t.add_column("accuracy", justify="right")
    for name, row in sorted(report.per_type.items()):
        t.add_row(name, str(row["n"]), f"{row['accuracy']:.1%}")
    t.add_row("all", str(report.n), f"{report.accuracy:.1%}")
    Console().print(t)
    return 0


# ---- TensorRT: build, bundle -------------------------------------------------------------------
def _build_trt(args: argparse.Namespace) -> int:
    from rich.console import Console

    from leanvlm.engines import trt_build
    from leanvlm.engines.trt_targets import Target, get_target
    from leanvlm.spec.manifest import load_engine_spec

    target = get_target(args.target)
    spec = load_engine_spec(args.engine)
    workspace = args.workspace if args.workspace is not None or target is None else target.workspace_gib
    if args.print_trtexec:
        if target is None:
            try:
                target = trt_build.detect_device()
            except UserError:  # no TensorRT or GPU here: the commands name the device by shell variables
                target = Target("trt", "this GPU (not detected)", sm="${SM}", tensorrt="${TRT_VERSION}", cuda="")
    else:
        target = trt_build.resolve_target(target)
    plan = trt_build.plan_build(spec, target, args.precision, workspace, args.timing_cache, args.builder_level,
                                args.max_batch, args.max_prompt, args.max_new_tokens, args.opt_batch, args.opt_prompt)
    if args.print_trtexec:
        print("\n".join(trt_build.trtexec_commands(plan)))
        return 0
    console = Console(stderr=True, log_path=False)
    with console.status("building TensorRT plans") as status:
        def on_step(msg: str) -> None:
            console.log(msg)
            status.update(msg)

        record = trt_build.run_build(plan, on_step)
    print(f"TensorRT {record['tensorrt']} plans for SM {record['compute_capability']} ({record['precision']}) in "
          f"{args.engine / record['dir']}: {record['build_seconds']['total']:.1f} s")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from leanvlm.engines.jetson_bundle import fits, make_bundle
    from leanvlm.engines.trt_targets import get_target

    target = get_target(args.target)  # argparse offers the Jetson targets only
    res = make_bundle(args.engine, target, args.out, max_batch=args.max_batch, max_prompt=args.max_prompt,
                      max_new_tokens=args.max_new_tokens, workspace_gib=args.workspace, force=args.force)
    est = res.estimate
    print(f"bundle for {target.name} written to {res.out} ({len(res.files)} files); estimated device memory "
          f"{_human(est['total_bytes'])} (+{est['reserved_gib']} GiB OS/CUDA)")
    if not fits(est, target):
        print(f"warning: that exceeds the smallest {target.name} module ({target.min_memory_gib} GB): lower "
              "--max-batch/--max-prompt, use a smaller precision or model, or a larger module", file=sys.stderr)
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _add_trt_commands(sub) -> None:
    from leanvlm.engines.trt_targets import TARGET_NAMES

    def limits(p):
        p.add_argument("--max-batch", type=int, help="largest batch the plans take (default: the engine's)")
        p.add_argument("--max-prompt", type=int, help="longest prompt in tokens (default: the engine's)")
        p.add_argument("--max-new-tokens", type=int, help="most generated tokens (default: the engine's)")
        p.add_argument("--workspace", type=_positive_float, metavar="GiB",
                       help="cap on TensorRT's builder workspace memory pool, in GiB (default: TensorRT's, or the "
                            "Jetson target's cap: 1 on Orin, 4 on Thor)")

    b = sub.add_parser("build", help="build TensorRT plans for an engine on this GPU (or print trtexec commands)")
    b.add_argument("engine", type=Path, help="engine directory made by export-engine")
    b.add_argument("--target", choices=TARGET_NAMES, default="trt",
                   help="trt: this machine's GPU (default); jetson-*: checks that this machine is that Jetson")
    b.add_argument("--precision", help="must match the engine's graphs (strongly typed); default: the engine's")
    limits(b)
    b.add_argument("--timing-cache", type=Path, help="timing cache file (default: trt/<dir>.timing-cache)")
    b.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default 1)")
    b.add_argument("--opt-prompt", type=int, help="prompt length the kernels are tuned for (default image tokens + 64)")
    b.add_argument("--builder-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    b.add_argument("--print-trtexec", action="store_true", help="print equivalent trtexec commands, build nothing")
    b.set_defaults(func=_build_trt)

    j = sub.add_parser("bundle", help="pack an engine for building and running on a Jetson")
    j.add_argument("engine", type=Path)
    j.add_argument("--target", required=True, choices=[t for t in TARGET_NAMES if t != "trt"])
    j.add_argument("--out", type=Path, required=True, help="FILE.tar.gz")
    limits(j)
    j.set_defaults(max_batch=1)
    j.add_argument("--force", action="store_true", help="replace an existing --out")
    j.set_defaults(func=_bundle)


def _serve(args: argparse.Namespace) -> int:
    import os

    from leanvlm.serve import Limits, ServeOptions

    _quiet_transformers()
    for flag, value, low in (("--port", args.port, 0), ("--max-queue", args.max_queue, 0),
                             ("--max-image-bytes", args.max_image_bytes, 1), ("--replicas", args.replicas, 1)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    if args.max_batch is not None and args.max_batch < 1:
        raise UserError(f"--max-batch {args.max_batch}: must be >= 1")
    if not (args.engine / "leanvlm.json").is_file():
        raise UserError(f"{args.engine}: not an engine directory (no leanvlm.json); make one with export-engine")
    key = args.api_key or os.environ.get("LEANVLM_API_KEY") or None
    options = ServeOptions(max_batch=args.max_batch, max_queue=args.max_queue, api_key=key, model_name=args.model_name,
                           limits=Limits(max_image_bytes=args.max_image_bytes, allow_image_urls=args.allow_image_urls,
                                         max_body_bytes=2 * args.max_image_bytes + (1 << 20)))
    if args.ray:
        from leanvlm.serve.ray_app import deploy

        print(f"Ray Serve: {args.replicas} replica(s) of {args.engine} on http://{args.host}:{args.port}/v1",
              file=sys.stderr)
        deploy(args.engine, args.host, args.port, args.replicas, args.backend, options, args.threads, blocking=True)
        return 0
    from leanvlm.serve import run

    run(args.engine, args.host, args.port, options, args.backend, args.threads, args.log_level)
    return 0


def _calib(args: argparse.Namespace) -> int:
    from rich.console import Console

    from leanvlm.calib.run import SearchOptions, run_gsearch, run_psigmoid

    _quiet_transformers()
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    opts = SearchOptions(model=args.model, out=args.out, data=args.data, n=args.n, seed=args.seed, batch=args.batch,
                         force=args.force)
    if args.search == "gsearch":
        opts.tolerance, opts.steps = args.tolerance, args.steps
        console.print(f"G-Search on {args.model}: {args.n} calibration samples, tolerance {args.tolerance}")

        def show(c) -> None:
            console.print(f"layer {c.layer:3d}  keep {c.keep_str:>9s}  accuracy {c.metric.accuracy:.3f}  "
                          f"lost {c.metric.lost} gained {c.metric.gained}  KL {c.metric.kl:.4f}  "
                          f"{'[green]pass[/green]' if c.passed else '[red]fail[/red]'}")

        result, record = run_gsearch(opts, show)
    else:
        opts.budget, opts.trials, opts.text_tokens = args.budget, args.trials, args.text_tokens
        console.print(f"P-Sigmoid on {args.model}: {args.n} calibration samples, prefill FLOPs budget {args.budget}, "
                      f"{args.trials} trials")

        def show(t) -> None:
            if t.metric is None:
                console.print(f"trial {t.number + 1:3d}/{args.trials}  k {t.k:6.2f}  x0 {t.x0:.2f}  over budget")
                return
            console.print(f"trial {t.number + 1:3d}/{args.trials}  k {t.k:6.2f}  x0 {t.x0_fit:.2f}  r_min {t.r_min:.3f}  "
                          f"FLOPs {t.flops_ratio:.3f}  accuracy {t.metric.accuracy:.3f}  lost {t.metric.lost} "
                          f"gained {t.metric.gained}  KL {t.metric.kl:.4f}")

        result, record = run_psigmoid(opts, show)
    console.print(f"unreduced accuracy {record['unreduced_accuracy']:.3f}; schedule accuracy {record['accuracy']:.3f} "
                  f"({record['lost']} answers lost, {record['gained']} gained), KL {record['kl']:.4f}, "
                  f"prefill FLOPs {record['prefill_flops_ratio']:.3f} of unreduced "
                  f"({record['flops_text_tokens']} text tokens); image tokens per layer "
                  f"{record['image_tokens_per_layer']}; {record['candidates_scored']} candidates in "
                  f"{record['wall_time_s']:.0f} s")
    print(f"wrote {args.out} (export with: export-engine --model {args.model} --schedule {args.out})")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, help="default: 64, or the engine's limit if lower")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=backend_names(), default=defaults.BACKEND,
                   help=f"runtime backend (default {defaults.BACKEND}; torch: the PyTorch reference)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leanvlm", description="leanvlm: export, run and check token-reduced VLM engines")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("make-tiny", help="write a small random-weight LLaVA checkpoint")
    t.add_argument("out", type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--preset", default="tiny", choices=PRESETS, help="tiny (tests), mid (benchmarks: 576 image "
                   "tokens, hidden 512, 8 layers, vocab 32000), shapes (shapes-llava's size), llava-7b-shape / "
                   "llava-13b-shape (LLaVA-1.5's real layer shapes)")
    t.add_argument("--layers", type=int, help="decoder layers to build (default: the preset's; a few layers of a "
                   "real-size preset check scale without the full model)")
    t.add_argument("--dtype", choices=SAVE_DTYPES, default="float32", help="weights as stored (default float32)")
    t.set_defaults(func=_make_tiny)
    e = sub.add_parser("export", help="same as export-engine", add_help=False, parents=[_export_parser("leanvlm export")])
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate text for image + prompt pairs with an engine")
    g.add_argument("engine", type=Path, help="engine directory made by export-engine")
    g.add_argument("--image", action="append", required=True, help="image path (repeat for a batch)")
    g.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    _add_backend_arg(g)
    g.add_argument("--json", action="store_true", help="one JSON object per request")
    g.add_argument("--stream", action="store_true", help="print text as it is produced")
    _add_sampling_args(g)
    g.set_defaults(func=_generate)

    q = sub.add_parser("parity", help="check an engine against the PyTorch reference of its schedule")
    q.add_argument("engine", type=Path)
    q.add_argument("--samples", type=int, default=4)
    q.add_argument("--steps", type=int, default=16)
    q.add_argument("--atol", type=float, help="logits tolerance (default: the engine precision's)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_parity)

    b = sub.add_parser("bench", help="latency and memory of an engine, optionally against a baseline")
    b.add_argument("engine", type=Path)
    b.add_argument("--baseline", type=Path, help="engine to compare against (e.g. the --keep 1 export)")
    _add_backend_arg(b)
    b.add_argument("--baseline-backend", choices=backend_names(), help="default: --backend")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=70, help="text tokens around the image (default 70)")
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bench)

    pl = sub.add_parser("plan", help="token counts, FLOPs and KV bytes of a schedule, from the model config")
    pl.add_argument("--model", required=True)
    pl.add_argument("--method", choices=METHODS, default=defaults.METHOD)
    pl.add_argument("--keep", type=float)
    pl.add_argument("--layer", type=int, default=defaults.FASTV_LAYER)
    pl.add_argument("--schedule", type=Path)
    pl.add_argument("--text-tokens", type=int, default=64)
    pl.add_argument("--kv-dtype-bytes", type=int, choices=(1, 2, 4), default=2,
                    help="bytes per cached value (2 = fp16, the usual deployment; our CPU engines use 4)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_plan)

    v = sub.add_parser("viz", help="draw which image tokens each stage kept, merged or dropped")
    v.add_argument("engine", type=Path)
    v.add_argument("--image", required=True)
    v.add_argument("--prompt", required=True)
    v.add_argument("--out", type=Path, default=Path("kept.png"))
    _add_backend_arg(v)
    v.set_defaults(func=_viz)

    ev = sub.add_parser("eval", help="accuracy of an engine on the shapes task or a JSONL file")
    ev.add_argument("engine", type=Path)
    ev.add_argument("--task", choices=("shapes",))
    ev.add_argument("--data", type=Path, help="JSONL: {image, question, answers[, type]} per line")
    ev.add_argument("--n", type=int, default=500, help="shapes: held-out samples (default 500)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch", type=int, help="requests per batch (default: the engine's max batch)")
    _add_backend_arg(ev)
    ev.add_argument("--predictions", action="store_true", help="with --json: include every prediction")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_eval)
    _add_trt_commands(sub)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (or Ray Serve replicas)")
    sv.add_argument("engine", type=Path)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, help="decode slots (default: the engine's max batch)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; past that: 429")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LEANVLM_API_KEY; none: open)")
    sv.add_argument("--allow-image-urls", action="store_true",
                    help="fetch http(s) image URLs (default: data: URLs only; the server then makes outbound requests)")
    sv.add_argument("--max-image-bytes", type=int, default=16 << 20, help="largest image a client may send")
    sv.add_argument("--model-name", help="the model id clients send (default: the engine directory's name)")
    sv.add_argument("--threads", type=int, help="onnxruntime intra-op threads per replica")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    sv.add_argument("--ray", action="store_true", help="deploy on Ray Serve (local instance, or $RAY_ADDRESS)")
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas (default 1)")
    _add_backend_arg(sv)
    sv.set_defaults(func=_serve)

    from leanvlm.calib.gsearch import DEFAULT_STEPS

    c = sub.add_parser("calib", help="search a reduction schedule on calibration data (G-Search, P-Sigmoid)")
    searches = c.add_subparsers(dest="search", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--model", required=True, help=f"as for export-engine ({', '.join(BUILTIN_MODELS)}, an "
                        "alias, a hub id or a local checkpoint)")
    common.add_argument("--data", default="shapes", help="'shapes' (the shapes task's calib split, disjoint from "
                        "leanvlm eval's test split) or a JSONL file {image, question, answers} per line (default shapes)")
    common.add_argument("--n", type=int, default=200, help="calibration samples (default 200)")
    common.add_argument("--out", type=Path, required=True, help="schedule file to write (YAML, for "
                        "export-engine --schedule)")
    common.add_argument("--seed", type=int, default=0, help="shapes data seed and optimiser seed (default 0)")
    common.add_argument("--batch", type=int, default=32, help="calibration requests per batch (default 32)")
    common.add_argument("--force", action="store_true", help="replace an existing --out")
    gs = searches.add_parser("gsearch", parents=[common], help="fewest tokens per layer within an accuracy tolerance",
                             description="G-Search: from shallow to deep layers, the fewest image tokens each layer "
                                         "keeps while calibration accuracy stays within --tolerance of unreduced.")
    gs.add_argument("--tolerance", type=float, default=0.01, help="accepted accuracy drop, a fraction (default "
                    "0.01 = one point); must be 0 or at least 1/--n")
    gs.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="count grid: multiples of image tokens/STEPS "
                    f"(default {DEFAULT_STEPS})")
    gs.set_defaults(func=_calib)
    ps = searches.add_parser("psigmoid", parents=[common], help="best accuracy within a prefill FLOPs budget",
                             description="P-Sigmoid: keep counts on a sigmoid over depth, its parameters tuned by "
                                         "Bayesian optimisation (optuna TPE) for accuracy within --budget.")
    ps.add_argument("--budget", type=float, required=True, help="prefill FLOPs vs unreduced, in (0, 1] (the FLOPs "
                    "model of leanvlm plan)")
    ps.add_argument("--trials", type=int, default=30, help="optimisation trials (default 30)")
    ps.add_argument("--text-tokens", type=int, help="prompt text tokens the FLOPs are computed for (default: the "
                    "calibration prompts' mean)")
    ps.set_defaults(func=_calib)
    return p


def main(argv: list[str] | None = None) -> int:
    """Console script `leanvlm`."""
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
