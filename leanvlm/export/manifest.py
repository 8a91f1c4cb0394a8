"""The engine directory's manifest, `leanvlm.json`: what was exported, how to feed it, and checksums.

The runtime trusts nothing it has not checked: `load_manifest` validates the schema version, required
fields and the sha256 of every file, and names exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from leanvlm.errors import EngineError

MANIFEST_NAME = "leanvlm.json"
FORMAT = "leanvlm-engine"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("format", "schema_version", "source", "schedule", "graphs", "limits", "cache_groups", "files",
                 "versions", "model")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(config_dict: dict) -> str:
    """sha256 of the model config as canonical JSON (sorted keys), to tie an engine to its checkpoint."""
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()


def graph_io(path: Path) -> dict:
    """Input/output names, shapes (ints or axis names) and element types of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"file": path.name, "opset": opset, "inputs": describe(model.graph.input),
            "outputs": describe(model.graph.output)}


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the manifest, keyed by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def write_manifest(directory: Path, body: dict) -> Path:
    """Write `leanvlm.json` with `body` plus format, schema version and checksums of the files there now."""
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **body, "files": file_checksums(directory)}
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class Manifest:
    """A validated manifest and the directory it describes."""

    directory: Path
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    @property
    def limits(self) -> dict:
        return self.data["limits"]

    def graph_path(self, name: str) -> Path:
        return self.directory / self.data["graphs"][name]["file"]


def load_manifest(directory: str | Path, verify_files: bool = True) -> Manifest:
    """Read and validate an engine directory's manifest; with verify_files, check every sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise EngineError(f"{directory}: no such engine directory (make one with `export-engine --out {directory}`)")
    if not path.is_file():
        raise EngineError(f"{directory}: no {MANIFEST_NAME}; not an engine directory made by export-engine")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EngineError(f"{path}: format is {data.get('format') if isinstance(data, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EngineError(f"{path}: schema version {version!r} is not supported by this leanvlm "
                          f"(it reads version {SCHEMA_VERSION}); re-export the engine with this version")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise EngineError(f"{path}: missing field(s) {', '.join(missing)}")
    if verify_files:
        verify_checksums(directory, data["files"])
    return Manifest(directory, data)


def verify_checksums(directory: Path, files: dict[str, str]) -> None:
    """Raise EngineError naming every missing, altered or unlisted file."""
    problems = []
    root = directory.resolve()
    for rel, digest in files.items():
        p = (directory / rel).resolve()
        if root not in p.parents:
            problems.append(f"{rel}: path leaves the engine directory")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 mismatch (file changed since export)")
    for graph in ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"):
        if graph not in files:
            problems.append(f"{graph}: not listed in the manifest")
    if problems:
        raise EngineError(f"{directory}: engine files failed verification: " + "; ".join(problems))
