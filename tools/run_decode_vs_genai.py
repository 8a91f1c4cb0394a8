#!/usr/bin/env python3
"""Reproduce benchmarks/decode-vs-genai.json: decode tokens/s at batch 1 of the unreduced mid engine against
ONNX Runtime GenAI's own Llama decoder of the same weights, at the same prompt length and thread count.

    python tools/run_decode_vs_genai.py [--work /tmp/leanvlm-genai] [--rounds 3] [--threads 2]

Builds the mid checkpoint (`make-tiny --preset mid`), exports it unreduced (keep 1.0, fp32), extracts its
language model and lm_head as a LlamaForCausalLM checkpoint and builds GenAI's model from it with GenAI's model
builder (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`). Needs `pip install onnxruntime-genai`.

Both sides run a 646-token prompt (576 image tokens + 70 text tokens for leanvlm, 646 text tokens for GenAI:
the decoder sees the same length) and generate 32 tokens greedily without stopping at EOS; decode tokens/s is
(tokens - 1) / (time from the first token to the last), prefill excluded, per-step Python included on both
sides (leanvlm: a full `Pipeline.generate`; GenAI: its `Generator.generate_next_token` loop, with its KV
buffer sized to prompt + new tokens as leanvlm's is). Each configuration runs in its own process, the
configurations alternate round by round (interleaved: machine noise hits all alike), and a process reports
the median of its repeats after warm-up; the report takes the median over rounds.

Settings that differ by default: leanvlm's float engines do not prepack weights (every session reads the one
memory-mapped weights file) and its sessions do not spin; GenAI's session prepacks and spins (ONNX Runtime's
defaults; its genai_config has no spinning switch). End to end, leanvlm runs as shipped and with
`prepack="decode"`. "graph only" runs the two decode graphs alone with identical session options (prepacked,
spinning off, then on), which separates the graphs from the runtimes around them.
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


def set_genai_threads(genai: Path, threads: int) -> None:
    """GenAI reads its session options from genai_config.json."""
    path = genai / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4))


# ---- one configuration, in a child process ---------------------------------------------------------
def child_leanvlm(engine: str, threads: int, new_tokens: int, repeats: int, warmup: int, prepack=None) -> dict:
    from transformers.utils import logging as hf_logging

    from leanvlm.runtime import Pipeline
    from leanvlm.runtime.bench import _image, _prompt_with_text_tokens

    hf_logging.set_verbosity_error()
    pipe = Pipeline.load(engine, threads=threads, prepack=prepack)
    prompt, text_tokens = _prompt_with_text_tokens(pipe, TEXT_TOKENS)
    image = _image(pipe)
    runs = []
    for i in range(warmup + repeats):
        r = pipe.generate(image, prompt, max_new_tokens=new_tokens, ignore_eos=True)
        if i >= warmup:
            runs.append(r.timings["decode_tokens_per_s"])
    return {"tokens_per_s": runs, "prompt_tokens": len(r.prompt_token_ids), "new_tokens": len(r.token_ids)}


def child_genai(model_dir: str, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(og.Config(model_dir))
    ids = np.random.default_rng(0).integers(5, 32000, prompt_tokens).astype(np.int32)
    total = prompt_tokens + new_tokens
    runs = []
    for i in range(warmup + repeats):
        params = og.GeneratorParams(model)
        # KV buffer sized to this request (past_present_share_buffer), no EOS stop, greedy: leanvlm's settings
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)  # prefill
        gen.generate_next_token()  # the first token, from the prefill's logits
        t0 = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()  # one decode run, then the next token
            steps += 1
        if i >= warmup:
            runs.append(steps / (time.perf_counter() - t0))
        del gen
    return {"tokens_per_s": runs, "prompt_tokens": prompt_tokens, "new_tokens": steps + 1}


def child_graph(graph: str, path: str, threads: int, spin: bool, prompt_tokens: int, new_tokens: int, repeats: int,
                warmup: int) -> dict:
    """The decode graph alone, in an InferenceSession with the same options on both sides (no tokenizer,
    sampling or embedding): leanvlm's through OrtBackend.decode on KVCache-style buffers and masks, GenAI's with
    its past and present bound to one shared buffer per layer (how GenAI runs it, past_present_share_buffer)."""
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
        backend = OrtBackend(spec, threads=threads, prepack="decode")  # as GenAI's session: prepacked
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
    runs = []
    for i in range(warmup + repeats):
        reset()
        t0 = time.perf_counter()
        for n in range(prompt_tokens, total - 1):
            step(n)
        if i >= warmup:
            runs.append((new_tokens - 1) / (time.perf_counter() - t0))
    return {"tokens_per_s": runs, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}


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
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"leanvlm": child_leanvlm, "genai": child_genai, "graph": child_graph}[args.child]
        print(json.dumps(fn(**json.loads(args.child_args))))
        return 0

    from run_benchmarks import machine

    engine, genai = build(args.work)
    set_genai_threads(genai, args.threads)
    common = dict(new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    lean = dict(engine=str(engine), threads=args.threads, **common)
    configs = {
        "leanvlm": ("leanvlm", lean, {"LEANVLM_ORT_SPIN": "0"}),
        "leanvlm, decode prepacked": ("leanvlm", {**lean, "prepack": "decode"}, {"LEANVLM_ORT_SPIN": "0"}),
        "genai": ("genai", dict(model_dir=str(genai), prompt_tokens=TEXT_TOKENS + 576, **common), None),
    }
    for spin in (False, True):  # the decode graphs alone, identical session options
        for graph, path in (("leanvlm", engine), ("genai", genai)):
            configs[f"graph only: {graph}{', spinning' if spin else ''}"] = (
                "graph", dict(graph=graph, path=str(path), threads=args.threads, spin=spin,
                              prompt_tokens=TEXT_TOKENS + 576, **common), None)
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (kind, child_args, env) in configs.items():
            out = run_child(kind, child_args, env)
            rounds[name].append(out)
            print(f"round {r + 1} {name}: {median(out['tokens_per_s']):.1f} tok/s", flush=True)
    results = {name: {"tokens_per_s_median": median([median(o["tokens_per_s"]) for o in outs]),
                      "per_round_medians": [round(median(o["tokens_per_s"]), 2) for o in outs],
                      "runs": [o["tokens_per_s"] for o in outs],
                      "prompt_tokens": outs[0]["prompt_tokens"], "new_tokens": outs[0]["new_tokens"]}
               for name, outs in rounds.items()}
    g = results["genai"]["tokens_per_s_median"]
    report = {
        "command": "python tools/run_decode_vs_genai.py " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "onnxruntime_genai": _genai_version()},
        "config": "mid preset decoder (Llama hidden 512, 8 layers, 8 heads, MLP 1376, vocab 32000), fp32, CPU, "
                  "batch 1, unreduced engine (keep 1.0) vs GenAI's model builder output of the same weights",
        "settings": {"threads": args.threads, "rounds": args.rounds, **common},
        "results": results,
        "ratios_vs_genai": {name: r["tokens_per_s_median"] / g for name, r in results.items()
                            if not name.startswith(("genai", "graph only"))},
        "graph_only_ratios": {
            spin: results[f"graph only: leanvlm{spin}"]["tokens_per_s_median"]
            / results[f"graph only: genai{spin}"]["tokens_per_s_median"] for spin in ("", ", spinning")},
        "decode_graph_nodes": {"leanvlm": optimized_nodes(engine / "decode.onnx", args.threads, args.work),
                               "genai": optimized_nodes(genai / "model.onnx", args.threads, args.work)},
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    for name, ratio in report["ratios_vs_genai"].items():
        print(f"{name}: {results[name]['tokens_per_s_median']:.1f} tok/s, {ratio:.3f}x GenAI ({g:.1f} tok/s)")
    for spin, ratio in report["graph_only_ratios"].items():
        print(f"graph only{spin}: leanvlm / GenAI {ratio:.3f}x")
    return 0


def _genai_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


if __name__ == "__main__":
    sys.exit(main())
