#!/usr/bin/env python3
"""Reproduce benchmarks/decode-vs-genai.json: decode tokens/s at batch 1 of the unreduced mid engine against
ONNX Runtime GenAI's own Llama decoder of the same weights, at the same prompt length and thread count.

    python tools/run_decode_vs_genai.py [--work /tmp/leanvlm-genai] [--rounds 3] [--threads 2]

Builds the mid checkpoint (`make-tiny --preset mid`), exports it unreduced (keep 1.0, fp32), extracts its
language model and lm_head as a LlamaForCausalLM checkpoint and builds GenAI's model from it with GenAI's model
builder (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`). Needs `pip install onnxruntime-genai`.

Both sides run a 646-token prompt (576 image tokens + 70 text tokens for leanvlm, 646 text tokens for GenAI:
the decoder sees the same length) and generate 32 tokens greedily without stopping at EOS, prefill excluded,
per-step Python included on both sides (leanvlm: full `Pipeline.generate` calls; GenAI: its
`Generator.generate_next_token` loop, with its KV buffer sized to prompt + new tokens as leanvlm's is). Decode
tokens/s is given per wall-clock second and per second of the process's CPU time; the latter, at 1 intra-op
thread, is the steady one on a shared machine (wall time there moves with everything else running). Each
configuration runs in its own process, configurations alternate round by round (interleaved), a process
reports the median of its repeats after warm-up, the report the median over rounds; end-to-end processes
also report their peak memory (PSS, anonymous + file-backed).

Settings that differ by default: leanvlm's sessions do not spin and, as shipped, only its decode session
prepacks weights (the other graphs read the one memory-mapped weights file); GenAI's session prepacks and spins
(ONNX Runtime's defaults; its genai_config has no spinning switch). End to end, leanvlm runs as shipped and with
no prepacking (`prepack=False`, the default before). "graph only" runs the two decode graphs alone with
identical session options (prepacked, not spinning), which separates the graphs from the runtimes around them;
`--compare-engine` adds another engine's decode graph (before/after a graph change).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TEXT_TOKENS = 70  # leanvlm's text tokens around the mid model's 576 image tokens: 646 in all


def build(work: Path) -> tuple[Path, Path]:
    """The unreduced mid engine and GenAI's model of the same decoder (built once per work directory)."""
    from leanvlm.export import ExportOptions, export_engine
    from leanvlm.models import make_tiny

    work.mkdir(parents=True, exist_ok=True)
    ckpt, engine, llama, genai = work / "mid", work / "mid-full", work / "mid-llama", work / "genai-mid"
    if not ckpt.exists():
        make_tiny(ckpt, preset="mid")
    if not (engine / "leanvlm.json").exists():
        print("exporting the unreduced mid engine", flush=True)
        export_engine(ExportOptions(model=str(ckpt), keep=1.0, out=engine, max_batch=1, force=True))
    if not (genai / "genai_config.json").exists():
        extract_llama(ckpt, llama)
        print("building GenAI's model", flush=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(genai),
                        "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       capture_output=True)
    return engine, genai


def extract_llama(checkpoint: Path, out: Path) -> None:
    """The LLaVA checkpoint's language model and lm_head as a LlamaForCausalLM checkpoint (fp32)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    cfg = llava.config.text_config
    cfg.architectures = ["LlamaForCausalLM"]
    llama = LlamaForCausalLM(cfg)
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)


# ---- one configuration, in a child process ---------------------------------------------------------
# Each child reports decode tokens/s twice: per wall-clock second (what a user sees; on a loaded machine it
# moves with everything else running) and per second of this process's CPU time (all its threads; with one
# intra-op thread this is the work itself, and it barely moves with the machine's load).

def child_leanvlm(engine: str, threads: int, new_tokens: int, repeats: int, warmup: int, prepack=None) -> dict:
    """Full `Pipeline.generate` calls. Wall: the generate's decode tokens/s. CPU: decode steps over the CPU time
    spent in them (`StepRunner.step`: embedding, the graph, the cache write, sampling and detokenisation of one
    token; the counterpart of GenAI's `generate_next_token`)."""
    from transformers.utils import logging as hf_logging

    from leanvlm.runtime import Pipeline
    from leanvlm.runtime.bench import MemorySampler, _image, _prompt_with_text_tokens
    from leanvlm.runtime.steps import StepRunner

    hf_logging.set_verbosity_error()
    spent = {"cpu": 0.0, "steps": 0}
    step = StepRunner.step

    def timed_step(self):
        c = time.process_time()
        out = step(self)
        spent["cpu"] += time.process_time() - c
        spent["steps"] += 1
        return out

    StepRunner.step = timed_step
    with MemorySampler() as memory:
        pipe = Pipeline.load(engine, threads=threads, prepack=prepack)
        prompt, _ = _prompt_with_text_tokens(pipe, TEXT_TOKENS)
        image = _image(pipe)
        wall, cpu = [], []
        for i in range(warmup + repeats):
            spent.update(cpu=0.0, steps=0)
            r = pipe.generate(image, prompt, max_new_tokens=new_tokens, ignore_eos=True)
            if i >= warmup:
                wall.append(r.timings["decode_tokens_per_s"])
                cpu.append(spent["steps"] / max(spent["cpu"], 1e-9))
    return {"tokens_per_s": wall, "tokens_per_cpu_s": cpu, "prompt_tokens": len(r.prompt_token_ids),
            "new_tokens": len(r.token_ids), "prepack": pipe.backend.prepack, "peak_memory_bytes": memory.peak}


def child_genai(model_dir: str, threads: int, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from leanvlm.runtime.bench import MemorySampler

    with MemorySampler() as memory:
        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(config)
        ids = np.random.default_rng(0).integers(5, 32000, prompt_tokens).astype(np.int32)
        total = prompt_tokens + new_tokens
        wall, cpu = [], []
        for i in range(warmup + repeats):
            params = og.GeneratorParams(model)
            # KV buffer sized to this request (past_present_share_buffer), no EOS stop, greedy: leanvlm's settings
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(ids)  # prefill
            gen.generate_next_token()  # the first token, from the prefill's logits
            t0, c0 = time.perf_counter(), time.process_time()
            steps = 0
            while not gen.is_done():
                gen.generate_next_token()  # one decode run, then the next token
                steps += 1
            if i >= warmup:
                wall.append(steps / (time.perf_counter() - t0))
                cpu.append(steps / (time.process_time() - c0))
            del gen
    return {"tokens_per_s": wall, "tokens_per_cpu_s": cpu, "prompt_tokens": prompt_tokens, "new_tokens": steps + 1,
            "peak_memory_bytes": memory.peak}


def child_graph(graph: str, path: str, threads: int, spin: bool, prompt_tokens: int, new_tokens: int, repeats: int,
                warmup: int) -> dict:
    """The decode graph alone, in an InferenceSession with the same options on both sides (prepacked, as GenAI's;
    no tokenizer, sampling or embedding): leanvlm's through OrtBackend.decode on KVCache-style buffers and masks,
    GenAI's with its past and present bound to one shared buffer per layer (how GenAI runs it,
    past_present_share_buffer)."""
    import numpy as np
    import onnxruntime as ort

    from leanvlm.engines.onnxruntime import create_session

    total = prompt_tokens + new_tokens
    rng = np.random.default_rng(0)
    if graph == "leanvlm":
        from leanvlm.runtime.backends.onnxruntime import OrtBackend
        from leanvlm.spec.manifest import load_engine_spec

        spec = load_engine_spec(path)
        os.environ["LEANVLM_ORT_SPIN"] = "1" if spin else "0"
        backend = OrtBackend(spec, threads=threads, prepack="decode")
        m = spec.model
        past = [tuple(np.zeros((1, m.num_kv_heads, total, m.head_dim), np.float32) for _ in range(2))
                for _ in range(m.num_layers)]
        mask = np.zeros((1, total + 1), np.int64)
        embeds = rng.standard_normal((1, 1, m.hidden_size)).astype(np.float32)

        def step(n: int) -> None:
            _, new = backend.decode(embeds, np.array([[n]], np.int64), [mask], past)
            for (k, v), (nk, nv) in zip(past, new):
                k[:, :, n:n + 1], v[:, :, n:n + 1] = nk, nv
            mask[:, n] = 1

        def reset() -> None:
            mask[:] = 0
            mask[:, :prompt_tokens] = 1
            mask[:, -1] = 1
    else:
        session = create_session(Path(path) / "model.onnx", ["CPUExecutionProvider"], threads, spin=spin, prepack=True)
        binding = session.io_binding()
        cfg = json.loads((Path(path) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        layers, shape = dec["num_hidden_layers"], (1, dec["num_key_value_heads"], total, dec["head_size"])
        buffers = {}
        for name in [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]:
            buffers[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            binding.bind_ortvalue_input(name, buffers[name])
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffers[name])
        logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, cfg["vocab_size"]), np.float32))
        binding.bind_ortvalue_output("logits", logits)
        ids = np.array([[7]], np.int64)

        def step(n: int) -> None:
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", np.ones((1, n + 1), np.int64))
            session.run_with_iobinding(binding)

        def reset() -> None:
            pass
    wall, cpu = [], []
    for i in range(warmup + repeats):
        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        for n in range(prompt_tokens, total - 1):
            step(n)
        if i >= warmup:
            wall.append((new_tokens - 1) / (time.perf_counter() - t0))
            cpu.append((new_tokens - 1) / (time.process_time() - c0))
    return {"tokens_per_s": wall, "tokens_per_cpu_s": cpu, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


def run_child(kind: str, args: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def optimized_nodes(path: Path, threads: int, work: Path) -> dict:
    """Node count of a graph as exported and after ONNX Runtime's full optimisation (CPU)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    out = work / f"optimized-{path.parent.name}-{path.stem}.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    count = lambda p: collections.Counter(n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node)  # noqa: E731
    exported, optimized = count(path), count(out)
    for leftover in out.parent.glob(out.name + "*"):
        leftover.unlink()
    return {"exported": sum(exported.values()), "optimized": sum(optimized.values()),
            "optimized_ops": dict(sorted(optimized.items()))}


def median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-genai"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "decode-vs-genai.json")
    ap.add_argument("--compare-engine", type=Path, help="also run the decode graph of this engine (e.g. one "
                    "exported by an earlier leanvlm) graph-only, for a before/after of the graph")
    ap.add_argument("--graph-only", action="store_true", help="only the decode graphs alone (no prefill: minutes "
                    "instead of tens of minutes on a loaded machine)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"leanvlm": child_leanvlm, "genai": child_genai, "graph": child_graph}[args.child]
        print(json.dumps(fn(**json.loads(args.child_args))))
        return 0

    from run_benchmarks import machine

    engine, genai = build(args.work)
    common = dict(new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    prompt_tokens = TEXT_TOKENS + 576
    configs = {}
    for threads in dict.fromkeys((args.threads, 1)):
        lean = dict(engine=str(engine), threads=threads, **common)
        t = f"{threads} thread{'s' if threads > 1 else ''}"
        if not args.graph_only:
            configs[f"{t}: leanvlm"] = ("leanvlm", lean, {"LEANVLM_ORT_SPIN": "0"})
            configs[f"{t}: leanvlm, no prepacking"] = ("leanvlm", {**lean, "prepack": False},
                                                       {"LEANVLM_ORT_SPIN": "0"})
            configs[f"{t}: genai"] = ("genai", dict(model_dir=str(genai), threads=threads,
                                                    prompt_tokens=prompt_tokens, **common), None)
        graphs = [("leanvlm", engine), ("genai", genai)]
        if args.compare_engine:
            graphs.append(("leanvlm", args.compare_engine))
        for graph, path in graphs:
            name = f"{t}: graph only, {graph}" + (" (compare engine)" if path == args.compare_engine else "")
            configs[name] = ("graph", dict(graph=graph, path=str(path), threads=threads, spin=False,
                                           prompt_tokens=prompt_tokens, **common), None)
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (kind, child_args, env) in configs.items():
            out = run_child(kind, child_args, env)
            rounds[name].append(out)
            print(f"round {r + 1} {name}: {median(out['tokens_per_s']):.1f} tok/s, "
                  f"{median(out['tokens_per_cpu_s']):.1f} per CPU s", flush=True)
    results = {}
    for name, outs in rounds.items():
        results[name] = {
            "tokens_per_s_median": median([median(o["tokens_per_s"]) for o in outs]),
            "tokens_per_cpu_s_median": median([median(o["tokens_per_cpu_s"]) for o in outs]),
            "per_round_medians": [round(median(o["tokens_per_s"]), 2) for o in outs],
            "per_round_cpu_medians": [round(median(o["tokens_per_cpu_s"]), 2) for o in outs],
            "prompt_tokens": outs[0]["prompt_tokens"], "new_tokens": outs[0]["new_tokens"]}
        if "peak_memory_bytes" in outs[0]:
            results[name]["peak_memory_bytes"] = max((o["peak_memory_bytes"] for o in outs), key=lambda m: m["total"])

    def ratios(key: str) -> dict:
        out = {}
        for name, r in results.items():
            t, _, what = name.partition(": ")
            base = f"{t}: graph only, genai" if what.startswith("graph only") else f"{t}: genai"
            if name != base and "genai" not in what:
                out[name] = r[key] / results[base][key]
        return out

    report = {
        "command": "python tools/run_decode_vs_genai.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "onnxruntime_genai": _genai_version()},
        "config": "mid preset decoder (Llama hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000), fp32, CPU, "
                  "batch 1, unreduced engine (keep 1.0) vs GenAI's model builder output of the same weights",
        "settings": {"threads": args.threads, "rounds": args.rounds, **common},
        "results": results,
        "ratios_vs_genai_wall": ratios("tokens_per_s_median"),
        "ratios_vs_genai_cpu": ratios("tokens_per_cpu_s_median"),
        "decode_graph_nodes": {"leanvlm": optimized_nodes(engine / "decode.onnx", args.threads, args.work),
                               "genai": optimized_nodes(genai / "model.onnx", args.threads, args.work)},
    }
    if args.compare_engine:
        report["decode_graph_nodes"]["compare_engine"] = optimized_nodes(args.compare_engine / "decode.onnx",
                                                                         args.threads, args.work)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    for name in report["ratios_vs_genai_wall"]:
        print(f"{name}: {report['ratios_vs_genai_wall'][name]:.3f}x GenAI per wall second, "
              f"{report['ratios_vs_genai_cpu'][name]:.3f}x per CPU second")
    return 0


def _genai_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


if __name__ == "__main__":
    sys.exit(main())
