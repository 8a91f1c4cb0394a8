"""export-engine: the happy path's report, and every bad input -> one line, exit 2, no output directory."""

import json
import os
import subprocess
import sys

import pytest

from leanvlm.cli import export_engine_main


def _run(capsys, *argv):
    code = export_engine_main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith(("error", "export-engine: error"))]


def test_export_reports_graphs_tokens_flops(capsys, tmp_path, tiny_dir):
    out = tmp_path / "eng"
    assert export_engine_main(["--model", str(tiny_dir), "--keep", "0.33", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for g in ("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"):
        assert g in text
    assert "64 -> 21" in text and "LLM layers 2-3" in text and "prefill FLOPs" in text and "export time" in text
    assert (out / "leanvlm.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_keep_one_exports_unreduced(tmp_path, tiny_dir):
    out = tmp_path / "full"
    assert export_engine_main(["--model", str(tiny_dir), "--keep", "1", "--out", str(out)]) == 0
    m = json.loads((out / "leanvlm.json").read_text())
    assert m["schedule"]["stages"] == [] and m["schedule"]["prefill_flops_ratio"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "--keep 0.0: must be in (0, 1]"),
    (["--keep", "1.5"], "--keep 1.5: must be in (0, 1]"),
    (["--keep", "-0.2"], "must be in (0, 1]"),
    (["--keep", "0.5", "--layer", "0"], "--layer 0: must be in [1, 3]"),
    (["--keep", "0.5", "--layer", "4"], "--layer 4: must be in [1, 3]"),
    (["--keep", "0.005"], "-> 0 of 64 image tokens"),
    (["--keep", "abc"], "invalid float value"),
    (["--keep", "0.5", "--opset", "23"], "--opset 23"),
    (["--keep", "0.5", "--max-batch", "0"], "--max-batch 0"),
])
def test_bad_numbers(capsys, tmp_path, tiny_dir, args, message):
    out = tmp_path / "never"
    code, errors = _raises_exit(capsys, "--model", str(tiny_dir), *args, "--out", str(out))
    assert code == 2
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def _raises_exit(capsys, *argv):
    try:
        code, errors = _run(capsys, *argv)
    except SystemExit as e:  # argparse errors
        code, errors = e.code, [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    return code, errors


@pytest.mark.parametrize("model, message", [
    ("llava-99b", "not a known alias"),
    ("./missing/checkpoint", "no such directory"),
    ("llava-7b", "not in the local Hugging Face cache"),
])
def test_bad_models(capsys, tmp_path, model, message):
    out = tmp_path / "never"
    code, errors = _raises_exit(capsys, "--model", model, "--keep", "0.5", "--out", str(out))
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_non_llava_checkpoint(capsys, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    code, errors = _raises_exit(capsys, "--model", str(tmp_path / "bert"), "--keep", "0.5", "--out", str(tmp_path / "o"))
    assert code == 2 and "is not supported" in errors[0]
    assert not (tmp_path / "o").exists()


def test_existing_non_empty_out_needs_force(capsys, tmp_path, tiny_dir):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, errors = _raises_exit(capsys, "--model", str(tiny_dir), "--keep", "0.5", "--out", str(out))
    assert code == 2 and "--force" in errors[0]
    assert (out / "keep.txt").read_text() == "user data"
    assert export_engine_main(["--model", str(tiny_dir), "--keep", "0.5", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "leanvlm.json").is_file()


def test_unwritable_out(capsys, tmp_path, tiny_dir):
    if os.geteuid() == 0:
        target = "/sys/kernel/leanvlm-out"  # sysfs refuses new entries even to root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = str(locked / "out")
    code, errors = _raises_exit(capsys, "--model", str(tiny_dir), "--keep", "0.5", "--out", target)
    assert code == 2 and "cannot write" in errors[0]


def test_out_under_a_file(capsys, tmp_path, tiny_dir):
    (tmp_path / "file").write_text("x")
    code, errors = _raises_exit(capsys, "--model", str(tiny_dir), "--keep", "0.5", "--out", str(tmp_path / "file" / "o"))
    assert code == 2 and "not a directory" in errors[0]


def test_failure_mid_export_leaves_nothing(monkeypatch, tmp_path, tiny_dir):
    import leanvlm.export.engine as engine_mod
    from leanvlm.errors import EngineError

    def broken(*a, **k):
        raise EngineError("simulated parity failure")

    monkeypatch.setattr("leanvlm.export.verify.compare_cases", broken)
    with pytest.raises(EngineError):
        engine_mod.export_engine(engine_mod.ExportOptions(model=str(tiny_dir), keep=0.5, out=tmp_path / "new" / "dir" / "o"))
    assert list(tmp_path.iterdir()) == []  # neither the engine nor the parents the export created


def test_not_enough_disk_is_refused_before_writing(monkeypatch, capsys, tmp_path, tiny_dir):
    import shutil as shutil_mod
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    real = shutil_mod.disk_usage
    monkeypatch.setattr("leanvlm.export.engine.shutil.disk_usage",
                        lambda p: usage(real(p).total, real(p).total - 100_000, 100_000))  # 100 kB free
    code, errors = _raises_exit(capsys, "--model", str(tiny_dir), "--keep", "0.5", "--out", str(tmp_path / "o"))
    assert code == 2 and "not enough disk space" in errors[0] and "GiB are free" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leanvlm.cli", "export", "--model", "tiny-llava", "--keep", "2",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --keep 2.0: must be in (0, 1] (the fraction of image tokens kept)"]
