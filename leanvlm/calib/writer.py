"""Write a searched schedule as a file `export-engine --schedule` takes, with a `search` header recording how
it was found. Written atomically (a temporary sibling renamed into place), so an interrupted or failed search
leaves no file, and never a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from leanvlm.errors import UserError
from leanvlm.reduction.schedule import Schedule


def check_out(path: Path, force: bool = False) -> Path:
    """Validate --out before a search starts (not after it has run for minutes)."""
    path = Path(path)
    if path.exists() and (path.is_dir() or not force):
        what = "a directory" if path.is_dir() else "an existing file (pass --force to replace it)"
        raise UserError(f"--out {path}: is {what}")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {path}: directory {parent} is not writable")
    return path


def schedule_yaml(schedule: Schedule, search: dict) -> str:
    """The schedule file's text: a comment, the `search` record, then one flow-style line per stage."""
    import yaml

    lines = [f"# made by leanvlm calib {search.get('method', '')}; export with: export-engine --model "
             f"{search.get('model', 'MODEL')} --schedule THIS_FILE",
             yaml.safe_dump({"search": search}, sort_keys=False, default_flow_style=False).rstrip()]
    if schedule.stages:
        lines.append("stages:")
        for s in schedule.stages:
            lines.append(f"  - {{layer: {s.layer}, keep: {s.num_keep}, score: {s.score}, score_at: {s.score_at}, "
                         f"positions: {s.positions}}}")
    else:
        lines.append("stages: []  # no layer could drop tokens within the tolerance")
    return "\n".join(lines) + "\n"


def write_schedule(path: Path, schedule: Schedule, search: dict) -> Path:
    """Write atomically; the result reads back as the same stages (checked before it is moved into place)."""
    path = Path(path)
    text = schedule_yaml(schedule, search)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        back = Schedule.from_file(tmp, schedule.num_layers, schedule.num_image_tokens)
        if back.stages != schedule.stages:  # pragma: no cover - the writer and the reader disagree
            raise RuntimeError(f"schedule file round trip changed the stages: {back.stages} != {schedule.stages}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
