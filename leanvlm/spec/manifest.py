"""The engine directory's manifest, `leanvlm.json`: reading, validating and writing it.

The runtime trusts nothing it has not checked: `load_engine_spec` validates the format, the schema version,
required fields and the sha256 of every file, names exactly what is wrong, and parses the result once into
an `EngineSpec`.

Schema policy: `schema_version` is "MAJOR.MINOR" (engines of leanvlm 0.1 wrote the integer 1). A reader
accepts every minor version of its major: minors only add fields, and a field it does not know is ignored;
a field added after an engine was written takes its documented default. A different major is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from leanvlm.errors import EngineError
from leanvlm.spec.names import GRAPH_NAMES, graph_file

MANIFEST_NAME = "leanvlm.json"
FORMAT = "leanvlm-engine"
SCHEMA_MAJOR = 1
SCHEMA_MINOR = 1  # 1.1: precision, artifacts, decode position offsets per cache group
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
REQUIRED_KEYS = ("format", "schema_version", "source", "schedule", "graphs", "limits", "cache_groups", "files",
                 "versions", "model")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Fields of a config that say how weights are stored or run, not which model it is: a checkpoint loaded in
# float16 is the same model as in float32.
_RUNTIME_CONFIG_KEYS = frozenset({"dtype", "torch_dtype", "_attn_implementation", "attn_implementation",
                                  "_attn_implementation_autoset", "transformers_version", "use_cache"})


def config_hash(config_dict: dict) -> str:
    """sha256 of the model config as canonical JSON (sorted keys) without dtype and other run-time fields, to
    tie an engine to its checkpoint whatever dtype it is loaded in."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _RUNTIME_CONFIG_KEYS}
        return x

    return hashlib.sha256(json.dumps(strip(config_dict), sort_keys=True, default=str).encode()).hexdigest()


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file below `directory` except the manifest, keyed by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def write_manifest(directory: Path, body: dict) -> Path:
    """Write `leanvlm.json` with `body` plus format, schema version and checksums of the files there now."""
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, **body, "files": file_checksums(directory)}
    return replace_manifest(directory, manifest)


def replace_manifest(directory: Path, data: dict) -> Path:
    """Write a complete manifest atomically (a temporary sibling renamed over it): a reader sees the old
    manifest or the new one, never half of one."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def schema_major(version) -> int | None:
    """The major number of a schema version (1, "1", "1.1"), or None when it is not one."""
    if isinstance(version, bool):
        return None
    if isinstance(version, int):
        return version
    if isinstance(version, str):
        head = version.split(".")[0]
        return int(head) if head.isdigit() else None
    return None


def read_manifest(directory: str | Path, verify_files: bool = True) -> dict:
    """Read and validate an engine directory's manifest JSON; with verify_files, check every sha256."""
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
    if schema_major(version) != SCHEMA_MAJOR:
        raise EngineError(f"{path}: schema version {version!r} is not supported by this leanvlm "
                          f"(it reads {SCHEMA_MAJOR}.x); re-export the engine with this version")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise EngineError(f"{path}: missing field(s) {', '.join(missing)}")
    if verify_files:
        verify_checksums(directory, data["files"])
    return data


def load_engine_spec(directory: str | Path, verify_files: bool = True):
    """The validated, parsed `EngineSpec` of an engine directory."""
    from leanvlm.spec.engine import EngineSpec

    directory = Path(directory)
    return EngineSpec.from_manifest(read_manifest(directory, verify_files), directory)


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
    for graph in map(graph_file, GRAPH_NAMES):
        if graph not in files:
            problems.append(f"{graph}: not listed in the manifest")
    if problems:
        raise EngineError(f"{directory}: engine files failed verification: " + "; ".join(problems))
