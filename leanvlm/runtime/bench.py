"""`leanvlm bench`: latency and memory of an engine, optionally against a baseline engine.

Each engine runs in its own subprocess: peak RSS is then that engine's alone, and no live ONNX Runtime
thread pool skews the other's timings (on 2 cores it would). Each measurement is a full generate()
after warm-up runs; the report gives the median and spread (p25-p75, min-max) of prefill latency,
time to first token and decode tokens/s, with peak memory and KV-cache bytes. Peak memory is given twice:
VmHWM (`peak_rss_bytes`, what `top` shows), and sampled proportional set size split into anonymous and
file-backed pages (`peak_memory_bytes`): the engine's weights are one memory-mapped file that the prefill and
decode sessions both map, which RSS counts twice and PSS, like physical memory, once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from leanvlm.errors import UserError


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which belongs to the process's own address space;
    ru_maxrss would carry the parent's peak across fork+exec and report the exporter's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_now() -> dict[str, int]:
    """This process's memory by kind (Linux), as proportional set size: `anon` (heap, arenas, copies: what
    memory pressure cannot take back) and `file` (mapped files such as the engine's weights: clean pages the
    kernel can drop and re-read). PSS, not RSS: two sessions mapping the same weights file count its pages
    once, as they are in physical memory. Empty where /proc is absent."""
    keys = {"Pss_Anon": "anon", "Pss_File": "file", "Pss_Shmem": "shmem"}
    out = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[keys[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemorySampler:
    """Peak anonymous and file-backed memory (PSS) over a `with` block, sampled every `interval` seconds by a
    thread: VmHWM gives only the peak of the sum, and counts a file mapped by two sessions twice."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.interval = interval
        self.peak = {"anon": 0, "file": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        m = memory_now()
        if m:
            self.peak["anon"] = max(self.peak["anon"], m["anon"])
            self.peak["file"] = max(self.peak["file"], m["file"])
            self.peak["total"] = max(self.peak["total"], m["anon"] + m["file"] + m.get("shmem", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _prompt_with_text_tokens(pipe, text_tokens: int) -> tuple[str, int]:
    """A user prompt whose templated, tokenized form has about `text_tokens` tokens besides the image
    tokens; returns it and the exact count."""
    tok = pipe.tokenizer
    n_img = pipe.spec.model.num_image_tokens
    filler = tok("the red circle is left of a small blue square near the top corner " * 200,
                 add_special_tokens=False)["input_ids"]
    image = _image(pipe)

    def count(k: int) -> int:
        return len(pipe.preprocess([image], [tok.decode(filler[:k])]).prompt_token_ids[0]) - n_img

    k = max(1, text_tokens - (count(1) - 1))
    while k > 1 and count(k) > text_tokens:
        k -= 1
    return tok.decode(filler[:k]), count(k)


def _image(pipe):
    from PIL import Image

    size = pipe.spec.model.image_size
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def bench_in_process(engine: str, backend: str = "onnxruntime", batch: int = 1, prompt_len: int = 70,
                     new_tokens: int = 32, repeats: int = 5, warmup: int = 2, threads: int | None = None) -> dict:
    """Measure one engine in this process (use `bench_engine` for a clean subprocess)."""
    from leanvlm.runtime import Pipeline

    options = {"threads": threads} if backend == "onnxruntime" and threads else {}
    if backend == "torch":
        options["device"] = os.environ.get("LEANVLM_BENCH_DEVICE")
        options["dtype"] = os.environ.get("LEANVLM_BENCH_DTYPE")
    with MemorySampler() as memory:
        pipe = Pipeline.load(engine, backend=backend, **options)
        report = bench_pipeline(pipe, batch, prompt_len, new_tokens, repeats, warmup)
    return {"engine": str(engine), "backend": backend, **report, "peak_memory_bytes": memory.peak}


def bench_pipeline(pipe, batch: int = 1, prompt_len: int = 70, new_tokens: int = 32, repeats: int = 5,
                   warmup: int = 2) -> dict:
    """Latency of full generate() calls on a Pipeline (an engine or an in-memory reference)."""
    from leanvlm.reduction.flops import prefill_flops_ratio

    if batch > pipe.spec.limits.max_batch:
        raise UserError(f"--batch {batch} exceeds the engine's max batch {pipe.spec.limits.max_batch}")
    prompt, text_tokens = _prompt_with_text_tokens(pipe, prompt_len)
    images, prompts = [_image(pipe)] * batch, [prompt] * batch
    kw = dict(max_new_tokens=new_tokens, ignore_eos=True)
    for _ in range(warmup):
        pipe.generate(images=images, prompts=prompts, **kw)
    runs = [pipe.generate(images=images, prompts=prompts, **kw)[0] for _ in range(repeats)]
    m = pipe.spec.model
    flops = prefill_flops_ratio(pipe.schedule, text_tokens, m.hidden_size, m.intermediate_size,
                                m.num_kv_heads / m.num_heads)
    return {
        "device": str(getattr(pipe.backend, "device", "cpu")), "dtype": str(getattr(pipe.backend, "dtype", "")),
        "batch": batch, "text_tokens": text_tokens, "image_tokens": m.num_image_tokens,
        "prompt_tokens": text_tokens + m.num_image_tokens, "new_tokens": new_tokens,
        "schedule": pipe.spec.schedule.to_dict(), "theoretical_prefill_flops_ratio": flops,
        "vision_s": _stats([r.timings["vision_s"] for r in runs]),
        "prefill_s": _stats([r.timings["prefill_s"] for r in runs]),
        "ttft_s": _stats([r.timings["ttft_s"] for r in runs]),
        "decode_tokens_per_s": _stats([r.timings["decode_tokens_per_s"] for r in runs]),
        "peak_rss_bytes": peak_rss_bytes(),
        "kv_cache": runs[-1].kv_cache,
    }


def bench_engine(engine: str | Path, **kwargs) -> dict:
    """`bench_in_process` in a fresh Python process; returns its JSON report."""
    cmd = [sys.executable, "-m", "leanvlm.runtime.bench", json.dumps({"engine": str(engine), **kwargs})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark of {engine} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(engine: dict, baseline: dict) -> dict:
    """Ratios of an engine against its baseline; prefill speed-up next to the theoretical FLOPs bound."""
    speedup = baseline["prefill_s"]["median"] / engine["prefill_s"]["median"]
    ideal = baseline["theoretical_prefill_flops_ratio"] / engine["theoretical_prefill_flops_ratio"]
    return {
        "prefill_speedup": speedup,
        "theoretical_prefill_speedup": ideal,
        "fraction_of_theoretical": speedup / ideal,
        "ttft_speedup": baseline["ttft_s"]["median"] / engine["ttft_s"]["median"],
        "decode_tokens_per_s_ratio": engine["decode_tokens_per_s"]["median"] / baseline["decode_tokens_per_s"]["median"],
        "kv_bytes_ratio": engine["kv_cache"]["used_bytes"] / baseline["kv_cache"]["used_bytes"],
        "peak_rss_ratio": engine["peak_rss_bytes"] / baseline["peak_rss_bytes"],
        "peak_memory_ratio": (engine["peak_memory_bytes"]["total"] / baseline["peak_memory_bytes"]["total"]
                              if baseline["peak_memory_bytes"]["total"] else None),  # no /proc: not measured
    }


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(json.dumps(bench_in_process(**json.loads(sys.argv[1]))))
