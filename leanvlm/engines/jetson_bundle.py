"""`leanvlm bundle ENGINE_DIR --target jetson-orin-jp6|jetson-thor-jp7 --out FILE.tar.gz`: what a Jetson needs to
build TensorRT plans on itself and run the engine.

Plans are tied to the GPU and TensorRT release that built them (JetPack has no hardware-compatibility mode),
so the bundle ships the ONNX graphs, not plans: `build.sh` on the device checks the files, finds TensorRT and
builds with tight profiles and a workspace cap sized for unified memory (an Orin Nano has 8 GB shared by the
CPU, the GPU and the OS). The bundle holds:

    <name>/engine/            graphs, weights, manifest (without other devices' builds), tokenizer, processor
    <name>/python/leanvlm/    leanvlm's own (pure Python) source, used when leanvlm is not installed
    <name>/build.sh           checks SHA256SUMS, then `leanvlm build` (TensorRT Python) or trtexec
    <name>/requirements-device.txt   pinned for the target's JetPack (Python, CUDA)
    <name>/bundle.json        target facts, build limits and the memory estimate
    <name>/README-device.md
    <name>/SHA256SUMS         every file above

Written to a temporary sibling of --out and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import leanvlm
from leanvlm.engines import trt_build
from leanvlm.engines.trt_targets import Target
from leanvlm.errors import UserError
from leanvlm.spec.engine import EngineSpec
from leanvlm.spec.manifest import MANIFEST_NAME, read_manifest, sha256_file

# Pure-Python runtime dependencies, pinned to the versions leanvlm's tests run with; NumPy 1.x on JetPack 6,
# whose TensorRT 10.3 Python bindings are built against it. onnxruntime-gpu and torch come from NVIDIA's
# Jetson AI Lab index, built for the JetPack's CUDA; TensorRT's Python module comes with JetPack itself.
_COMMON = ["onnx==1.23.2", "polygraphy==0.53.6", "tokenizers==0.23.3", "transformers==5.24.0", "jinja2==3.1.6",
           "pillow==13.0.0", "rich==15.0.0", "pyyaml==6.0.4"]
DEVICE_REQUIREMENTS = {
    "jetson-orin-jp6": {"index": "https://pypi.jetson-ai-lab.io/jp6/cu126", "numpy": "numpy==1.26.4",
                        "onnxruntime": "onnxruntime-gpu==1.20.0", "torch": "torch==2.5.0",
                        "tensorrt_apt": "python3-libnvinfer (JetPack 6.2: TensorRT 10.3)"},
    "jetson-thor-jp7": {"index": "https://pypi.jetson-ai-lab.io/sbsa/cu130", "numpy": "numpy==2.2.6",
                        "onnxruntime": "onnxruntime-gpu==1.23.0", "torch": "torch==2.9.0",
                        "tensorrt_apt": "python3-libnvinfer (JetPack 7.2.2+: TensorRT 11.4)"},
}
# Bytes the OS, the Python process and CUDA's context take on a Jetson before any engine memory (measured on
# no device here: NVIDIA's guidance for Orin Nano is ~1-1.5 GB for a headless JetPack).
RESERVED_GIB = 1.5


@dataclass
class BundleResult:
    out: Path
    files: dict  # relative path in the bundle -> sha256
    estimate: dict


def _engine_files(engine_dir: Path, files: dict) -> list[str]:
    """The engine's files a device needs: every file the manifest lists, except TensorRT plans."""
    return sorted(f for f in files if not f.startswith(trt_build.TRT_DIR + "/"))


def memory_estimate(spec: EngineSpec, data: dict, max_batch: int, max_prompt: int, max_new_tokens: int,
                    workspace_gib: float) -> dict:
    """Rough device memory of running the engine with TensorRT at these limits: every graph's plan holds its
    own copy of the weights it uses (prefill and decode each carry the decoder), plus the KV cache at the
    limits, plus the workspace cap."""
    export = data.get("export") or {}
    per_graph = export.get("graph_weight_bytes") or {}
    weights = sum(int(v) for v in per_graph.values()) if per_graph else 2 * int(export.get("weights_file_bytes", 0))
    m = spec.model
    n_img = m.num_image_tokens
    kv = 0
    for g in spec.cache_groups:
        cap = max_prompt - (n_img - g.image_tokens) + max_new_tokens
        kv += 2 * len(g.layers) * max_batch * m.num_kv_heads * cap * m.head_dim * spec.precision.itemsize
    total = weights + kv + int(workspace_gib * (1 << 30))
    return {"plan_weight_bytes": weights, "kv_cache_bytes": kv, "workspace_bytes": int(workspace_gib * (1 << 30)),
            "total_bytes": total, "reserved_gib": RESERVED_GIB}


def fits(estimate: dict, target: Target) -> bool:
    """Whether the estimate plus the OS/CUDA reserve fits the target family's smallest module."""
    return estimate["total_bytes"] / (1 << 30) + estimate["reserved_gib"] <= target.min_memory_gib


def make_bundle(engine_dir: str | Path, target: Target, out: str | Path, max_batch: int | None = 1,
                max_prompt: int | None = None, max_new_tokens: int | None = None, workspace_gib: float | None = None,
                force: bool = False) -> BundleResult:
    """Write the bundle for `target`; errors (UserError) name the bad input."""
    from leanvlm.engines.trt_profiles import profile_limits
    from leanvlm.spec.manifest import load_engine_spec

    engine_dir = Path(engine_dir)
    out = Path(out)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise UserError(f"--out {out}: name a .tar.gz file")
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    spec = load_engine_spec(engine_dir)  # verifies every checksum: a damaged engine is not shipped
    data = read_manifest(engine_dir, verify_files=False)
    target.check_precision(spec.precision.name)
    workspace = target.workspace_gib if workspace_gib is None else workspace_gib
    if not (isinstance(workspace, (int, float)) and 0 < workspace <= target.min_memory_gib):
        raise UserError(f"--workspace {workspace}: must be in (0, {target.min_memory_gib}] GiB for {target.name}")
    lim = profile_limits(spec, max_batch=max_batch, max_prompt=max_prompt, max_new_tokens=max_new_tokens)
    plan = trt_build.plan_build(spec, target, workspace_gib=workspace, max_batch=lim.max_batch,
                                max_prompt=lim.max_prompt, max_new_tokens=lim.max_new_tokens)  # lints for the target
    estimate = memory_estimate(spec, data, lim.max_batch, lim.max_prompt, lim.max_new_tokens, workspace)
    name = f"{engine_dir.resolve().name}-{target.name}"
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        root = Path(tmp) / name
        _write_tree(root, engine_dir, data, target, plan, lim, estimate)
        sums = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
        (root / "SHA256SUMS").write_text("".join(f"{d}  {f}\n" for f, d in sums.items()))
        part = Path(tmp) / "bundle.tar.gz"
        with tarfile.open(part, "w:gz") as tar:
            tar.add(root, arcname=name, filter=_normalise)
        os.replace(part, out)
    return BundleResult(out, sums, estimate)


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_tree(root: Path, engine_dir: Path, data: dict, target: Target, plan, lim, estimate: dict) -> None:
    eng = root / "engine"
    eng.mkdir(parents=True)
    files = _engine_files(engine_dir, data["files"])
    for rel in files:
        dst = eng / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine_dir / rel, dst)
    manifest = dict(data)  # other devices' plans stay behind: the device builds its own
    manifest["files"] = {f: data["files"][f] for f in files}
    artifacts = {k: v for k, v in (data.get("artifacts") or {}).items() if k != trt_build.BACKEND}
    manifest["artifacts"] = artifacts
    (eng / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    src = Path(leanvlm.__file__).parent
    shutil.copytree(src, root / "python" / "leanvlm",  # the built-in checkpoints' weights are not needed there
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.safetensors"))
    # trtexec lines relative to the bundle's engine directory, for devices without TensorRT's Python module
    rel_plan = trt_build.BuildPlan(Path("$ENGINE"), plan.target, plan.precision, plan.dir_name, plan.limits,
                                   plan.workspace_bytes, Path("$ENGINE") / plan.timing_cache.relative_to(engine_dir)
                                   if plan.timing_cache.is_relative_to(engine_dir) else plan.timing_cache,
                                   plan.builder_level,
                                   [trt_build.GraphBuild(g.graph, Path("$ENGINE") / g.onnx.name, g.plan, g.profiles)
                                    for g in plan.graphs])
    trtexec = trt_build.trtexec_commands(rel_plan)
    info = {"leanvlm": leanvlm.__version__, "target": target.to_dict(), "precision": plan.precision,
            "limits": lim.to_dict(), "workspace_gib": plan.workspace_bytes / (1 << 30), "memory_estimate": estimate,
            "plan_dir": plan.out_rel, "build_command": _leanvlm_build_args(target, lim, plan),
            "trtexec": trtexec}
    (root / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    (root / "requirements-device.txt").write_text(_requirements(target))
    build = root / "build.sh"
    build.write_text(_build_script(target, lim, plan, trtexec))
    build.chmod(0o755)
    (root / "README-device.md").write_text(_readme(root.name, target, lim, plan, estimate))


def _leanvlm_build_args(target: Target, lim, plan) -> list[str]:
    return ["build", "$ENGINE", "--target", target.name, "--workspace", f"{plan.workspace_bytes / (1 << 30):g}",
            "--max-batch", str(lim.max_batch), "--max-prompt", str(lim.max_prompt),
            "--max-new-tokens", str(lim.max_new_tokens), "--opt-batch", str(lim.opt_batch),
            "--opt-prompt", str(lim.opt_prompt)]


def _requirements(target: Target) -> str:
    r = DEVICE_REQUIREMENTS[target.name]
    lines = [f"# {target.description}: Python {target.python}, CUDA {target.cuda}, TensorRT {target.tensorrt}.",
             f"# TensorRT's Python module is JetPack's own package ({r['tensorrt_apt']}), not a pip wheel.",
             "# Install: pip install -r requirements-device.txt (leanvlm itself runs from ./python, or",
             "#   pip install --no-deps <leanvlm wheel>: its torch/transformers-heavy export side is not needed here).",
             f"--extra-index-url {r['index']}",
             r["numpy"], *_COMMON,
             "# onnxruntime backend (no torch needed):",
             r["onnxruntime"],
             "# tensorrt backend only (its device buffers are torch CUDA tensors; see README-device.md): uncomment",
             f"# {r['torch']}"]
    return "\n".join(lines) + "\n"


def _build_script(target: Target, lim, plan, trtexec: list[str]) -> str:
    args = " ".join(_leanvlm_build_args(target, lim, plan)).replace("$ENGINE", '"$ENGINE"')
    major_minor = ".".join(target.tensorrt.split(".")[:2])
    l4t = {"6": "36", "7": "38"}.get((target.jetpack or "").split(".")[0], "")
    body = "\n".join(trtexec)
    return f"""#!/usr/bin/env bash
# Build TensorRT plans for {target.description} on the device itself (plans are tied to the GPU and the
# TensorRT release that built them). Usage: ./build.sh [--dry-run]
#   --dry-run   run every check (checksums, TensorRT, device) and print the build command, build nothing
# Environment: PYTHON (default python3), WORKSPACE_GIB (default {plan.workspace_bytes / (1 << 30):g}).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
ENGINE="$HERE/engine"
PYTHON="${{PYTHON:-python3}}"
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) echo "build.sh: unknown argument $a (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

cd "$HERE"
if ! sha256sum --quiet -c SHA256SUMS; then
  echo "error: bundle files do not match SHA256SUMS (damaged copy?); copy the bundle again" >&2
  exit 3
fi

if [ -f /etc/nv_tegra_release ] && [ -n "{l4t}" ] && ! grep -q "R{l4t}" /etc/nv_tegra_release; then
  echo "warning: this bundle is for JetPack {target.jetpack} (L4T R{l4t}); /etc/nv_tegra_release says:" >&2
  head -1 /etc/nv_tegra_release >&2
fi

if ! "$PYTHON" -c "import leanvlm" 2>/dev/null; then
  export PYTHONPATH="$HERE/python${{PYTHONPATH:+:$PYTHONPATH}}"
fi

if "$PYTHON" -c "import tensorrt, polygraphy, onnx" 2>/dev/null; then
  TRT_VERSION="$("$PYTHON" -c "import tensorrt; print(tensorrt.__version__)")"
  case "$TRT_VERSION" in
    {major_minor}|{major_minor}.*) ;;
    *) echo "error: TensorRT $TRT_VERSION found; this bundle targets TensorRT {target.tensorrt} ({target.name})." \\
         "Bundle again for this device's JetPack (leanvlm bundle --target ...)" >&2; exit 4 ;;
  esac
  CMD=("$PYTHON" -m leanvlm.cli {args})
  if [ -n "${{WORKSPACE_GIB:-}}" ]; then CMD+=(--workspace "$WORKSPACE_GIB"); fi
  echo "building with leanvlm (TensorRT $TRT_VERSION): ${{CMD[*]}}"
  if [ "$DRY" = 1 ]; then exit 0; fi
  exec "${{CMD[@]}}"
fi

TRTEXEC="$(command -v trtexec || true)"
if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi
if [ -n "$TRTEXEC" ]; then
  echo "TensorRT's Python module is missing; building with $TRTEXEC (no build record: the leanvlm runtime"
  echo "will not pick these plans up; install TensorRT's Python module and rerun for that)"
  trtexec() {{ "$TRTEXEC" "$@"; }}
  if [ "$DRY" = 1 ]; then
    cat <<'EOF'
{body}
EOF
    exit 0
  fi
{_indent(body)}
  exit 0
fi

echo "error: TensorRT not found on this machine: neither its Python module (import tensorrt with $PYTHON) nor" \\
     "trtexec. On the Jetson: sudo apt install nvidia-jetpack (or python3-libnvinfer and tensorrt), then" \\
     "pip install -r requirements-device.txt, and rerun ./build.sh" >&2
exit 5
"""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _readme(name: str, target: Target, lim, plan, est: dict) -> str:
    def gib(b: float) -> str:
        return f"{b / (1 << 30):.2f} GiB" if b >= 1 << 30 else f"{b / (1 << 20):.1f} MiB"

    return f"""# {name}: on the device

Target: {target.description} (SM {target.sm}, TensorRT {target.tensorrt}, CUDA {target.cuda}).
Precision: {plan.precision}. Plans go to `engine/{plan.out_rel}/`.

## 1. Install
```
sudo apt install nvidia-jetpack          # TensorRT, CUDA, trtexec (JetPack {target.jetpack})
pip install -r requirements-device.txt   # runtime; onnxruntime-gpu from NVIDIA's Jetson index
```
leanvlm runs from `./python` when it is not installed (`build.sh` sets PYTHONPATH). torch is needed only for
the `tensorrt` backend, whose device buffers are torch CUDA tensors; the `onnxruntime` backend needs none.

## 2. Build (on this device)
```
./build.sh --dry-run   # checks files, TensorRT, JetPack; prints the command
./build.sh
```
`build.sh` verifies SHA256SUMS, then runs `leanvlm build` (TensorRT's Python module + Polygraphy), or trtexec
if the Python module is missing (those plans carry no build record, so only your own runtime loads them).
Profiles are tight for unified memory: batch <= {lim.max_batch}, prompt <= {lim.max_prompt} tokens,
<= {lim.max_new_tokens} new tokens, builder workspace capped at {gib(plan.workspace_bytes)} (WORKSPACE_GIB overrides).

Memory estimate at these limits: plans {gib(est['plan_weight_bytes'])} (prefill and decode plans each hold the
decoder weights), KV cache {gib(est['kv_cache_bytes'])}, workspace {gib(est['workspace_bytes'])}:
{gib(est['total_bytes'])} plus about {RESERVED_GIB} GiB for the OS and CUDA.
{'Fits' if fits(est, target) else 'Does NOT fit'} the smallest {target.name} module ({target.min_memory_gib} GB).

## 3. Run
```
export PYTHONPATH=$PWD/python   # unless leanvlm is installed
python3 -m leanvlm.cli generate engine --backend tensorrt --image cat.jpg --prompt "What is this?"
python3 -m leanvlm.cli generate engine --backend onnxruntime ...   # no TensorRT build needed
```
The tensorrt backend loads the plans recorded for this GPU and TensorRT release and refuses others (rebuild here).
"""
