#!/usr/bin/env python3
"""Serving load test -> benchmarks/serve-cpu.json: a real `leanvlm serve` process per run, 16 concurrent
streaming clients (closed loop), continuous batching (--max-batch 16) against one request at a time
(--max-batch 1, the others queued), runs interleaved. Engines: shapes-llava FastV keep 0.33, and the mid
preset (576 image tokens) FastV keep 0.33 and unreduced, all exported with --max-batch 16.

    python tools/run_serve_benchmark.py [--work /tmp/leanvlm-serve-bench] [--clients 16] [--max-tokens 64 256]

Every request is greedy with the same max_tokens in both modes, so both modes generate the same tokens
(checked: the per-request answers must be equal); tokens/s counts generated tokens over the wall time. Before the
one-at-a-time run, one request runs alone on the idle server: its time to first token against its whole time is
the prefill's share, which bounds what batching the decode can gain (ONNX Runtime's CPU prefill of a batch costs
the sum of its requests).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.run_benchmarks import fresh_workdir, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, seed: int = 0) -> list[dict]:
    """n chat requests on held-out shapes images (resized by the server's processor to the engine's size)."""
    from leanvlm.eval.shapes import generate

    return [{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(s.image)}},
        {"type": "text", "text": f"{s.question} Describe the picture."}]}]} for s in generate(n, seed, "test")]


class Server:
    """`leanvlm serve ENGINE --max-batch M` in its own process."""

    def __init__(self, engine: Path, max_batch: int, threads: int | None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "leanvlm.cli", "serve", str(engine), "--port", str(self.port), "--max-batch",
               str(max_batch), "--max-queue", "256", "--model-name", "m", "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.5)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if (piece or choice.get("finish_reason")) and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece or "")
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "text": "".join(text),
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}


async def load(url: str, requests: list[dict], clients: int, max_tokens: int) -> dict:
    """`clients` closed-loop workers share the request list; returns per-request results and the wall time."""
    todo = list(enumerate(requests))
    results: dict[int, dict] = {}

    async def worker(client):
        while todo:
            i, body = todo.pop(0)
            results[i] = await _one(client, url, {**body, "model": "m", "max_tokens": max_tokens, "temperature": 0,
                                                  "stream": True, "stream_options": {"include_usage": True}})

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await asyncio.gather(*[worker(client) for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "results": [results[i] for i in range(len(requests))]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarise(run: dict) -> dict:
    res = run["results"]
    tokens = sum(r["completion_tokens"] for r in res)
    lat, ttft = [r["latency_s"] for r in res], [r["ttft_s"] for r in res]
    return {"requests": len(res), "wall_s": round(run["wall_s"], 3), "requests_per_s": len(res) / run["wall_s"],
            "completion_tokens": tokens, "tokens_per_s": tokens / run["wall_s"],
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in res)}


def bench_engine(engine: Path, clients: int, n_requests: int, max_tokens: int, rounds: int, threads: int | None,
                 max_batch: int) -> dict:
    requests = workload(n_requests)
    runs: dict[str, list] = {"continuous": [], "one_at_a_time": []}
    answers: dict[str, list] = {}
    solo = []  # one request with the server otherwise idle: what prefill costs against the decode
    for r in range(rounds):
        for mode, mb in (("continuous", max_batch), ("one_at_a_time", 1)):
            srv = Server(engine, mb, threads)
            try:
                asyncio.run(load(srv.url, requests[:4], 4, 8))  # warm-up
                if mode == "one_at_a_time":
                    solo.append(asyncio.run(load(srv.url, requests[:1], 1, max_tokens))["results"][0])
                load_avg = os.getloadavg()[0]
                run = asyncio.run(load(srv.url, requests, clients, max_tokens))
            finally:
                srv.close()
            s = {**summarise(run), "load_average_1min": [round(load_avg, 2), round(os.getloadavg()[0], 2)]}
            print(f"  round {r} {mode:14s} {s['tokens_per_s']:7.1f} tok/s {s['requests_per_s']:6.2f} req/s "
                  f"p50 {s['latency_p50_s']:.2f}s p99 {s['latency_p99_s']:.2f}s ttft p99 {s['ttft_p99_s']:.2f}s",
                  flush=True)
            runs[mode].append(s)
            answers.setdefault(mode, [x["text"] for x in run["results"]])
    same = answers["continuous"] == answers["one_at_a_time"]
    med = {m: {k: statistics.median(x[k] for x in v) for k in v[0] if k != "load_average_1min"}
           for m, v in runs.items()}
    ratio = [c["tokens_per_s"] / o["tokens_per_s"] for c, o in zip(runs["continuous"], runs["one_at_a_time"])]
    ttft, total = statistics.median(x["ttft_s"] for x in solo), statistics.median(x["latency_s"] for x in solo)
    tokens = solo[0]["completion_tokens"]
    return {"engine": engine.name, "max_tokens": max_tokens, "runs": runs, "median": med,
            "tokens_per_s_ratio_per_round": ratio, "tokens_per_s_ratio": statistics.median(ratio),
            "same_answers_in_both_modes": same,
            # Amdahl: a CPU prefill batch costs its requests' sum, so batching can only shrink the decode part
            "alone": {"ttft_s": ttft, "total_s": total, "completion_tokens": tokens,
                      "decode_tokens_per_s": (tokens - 1) / max(total - ttft, 1e-9),
                      "prefill_share": ttft / total, "ratio_bound_free_decode": total / ttft}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/leanvlm-serve-bench"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=1, help="requests per client")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64, 256],
                   help="max_tokens of every request; several values: one run per engine and value")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads of the server (default: all cores)")
    p.add_argument("--engines", nargs="+", default=["mid-fastv", "shapes-fastv", "mid-full"])
    p.add_argument("--reuse", action="store_true", help="keep engines already in --work")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve-cpu.json")
    args = p.parse_args()
    from leanvlm.export import ExportOptions, export_engine
    from leanvlm.models import make_tiny

    work = args.work if args.reuse and args.work.exists() else fresh_workdir(args.work)
    specs = {"shapes-fastv": ("shapes-llava", 0.33), "mid-fastv": ("mid", 0.33), "mid-full": ("mid", 1.0)}
    report = {"machine": machine(), "command": "python tools/run_serve_benchmark.py " + " ".join(sys.argv[1:]),
              "clients": args.clients, "requests": args.clients * args.requests, "max_tokens": args.max_tokens,
              "rounds": args.rounds, "engines": {}}
    for name in args.engines:
        model, keep = specs[name]
        if model == "mid":
            ckpt = work / "mid-ckpt"
            if not ckpt.exists():
                make_tiny(ckpt, seed=0, preset="mid")
            model = str(ckpt)
        out = work / name
        if not (out / "leanvlm.json").exists():
            print(f"exporting {name}", flush=True)
            export_engine(ExportOptions(model=model, keep=keep, out=out, force=True, max_batch=args.clients))
        for max_tokens in args.max_tokens:
            print(f"{name}, max_tokens {max_tokens}:", flush=True)
            result = bench_engine(out, args.clients, args.clients * args.requests, max_tokens, args.rounds,
                                  args.threads, args.clients)
            report["engines"][f"{name}, max_tokens {max_tokens}"] = {"model": specs[name][0], "keep": keep, **result}
            tmp = args.out.with_suffix(".tmp")  # after each run: a long run stopped early keeps what it measured
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(args.out)
            print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
