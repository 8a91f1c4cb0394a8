"""leanvlm generate / parity / bench / make-tiny from the command line."""

import json

import pytest

from conftest import images
from leanvlm.cli import main


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, img in enumerate(images(2)):
        paths.append(d / f"{i}.png")
        img.save(paths[-1])
    return [str(p) for p in paths]


def test_generate_json_batch(capsys, engines, image_paths):
    out = engines(0.33).out
    code = main(["generate", str(out), "--image", image_paths[0], "--prompt", "Hi", "--image", image_paths[1],
                 "--prompt", "What is in the picture?", "--max-new-tokens", "6", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"prompt_token_ids", "token_ids", "text", "kept", "timings"}
        assert len(row["kept"][0]) == 21 and 1 <= len(row["token_ids"]) <= 6


def test_generate_stream_matches_plain(capsys, engines, image_paths):
    out = str(engines(0.33).out)
    assert main(["generate", out, "--image", image_paths[0], "--prompt", "Hi", "--max-new-tokens", "10"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", out, "--image", image_paths[0], "--prompt", "Hi", "--max-new-tokens", "10", "--stream"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("args, message", [
    (["--image", "{img}", "--prompt", "Hi", "--prompt", "Hello"], "give them in pairs"),
    (["--image", "/no/such.png", "--prompt", "Hi"], "no such file"),
    (["--image", "{img}", "--prompt", "Hi", "--max-new-tokens", "100000"], "exceeds this engine's limit"),
    (["--image", "{img}", "--prompt", "Hi", "--top-p", "0"], "top_p"),
])
def test_generate_bad_input(capsys, engines, image_paths, args, message):
    args = [a.replace("{img}", image_paths[0]) for a in args]
    assert main(["generate", str(engines(0.33).out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_on_missing_engine(capsys, tmp_path, image_paths):
    assert main(["generate", str(tmp_path / "nope"), "--image", image_paths[0], "--prompt", "Hi"]) == 2
    assert "no such engine directory" in capsys.readouterr().err


def test_parity_passes_and_reports_reduction_cost(capsys, engines):
    assert main(["parity", str(engines(0.33).out), "--samples", "2", "--steps", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["polygraphy_passed"]
    assert report["logits_max_abs"] < 1e-4 and report["kept_agreement"] == 1 and report["greedy_agreement"] == 1
    red = report["reduced_vs_unreduced"]
    assert 0 <= red["greedy_agreement"] <= 1 and red["logit_kl_mean"] > 0  # the schedule changes the output


def _swap_prefill(src, donor, dst, files=("prefill.onnx",)):
    """A copy of engine `src` with `files` taken from `donor`, checksums rewritten to match."""
    import shutil

    from leanvlm.spec.manifest import write_manifest

    shutil.copytree(src, dst)
    for name in files:
        shutil.copy(donor / name, dst / name)
    data = json.loads((dst / "leanvlm.json").read_text())
    for key in ("format", "schema_version", "files"):
        data.pop(key)
    write_manifest(dst, data)
    return dst


def test_parity_fails_on_a_same_shape_wrong_engine(capsys, engines, tmp_path):
    """Same shapes, other weights (the weights file of a checkpoint of another seed, which every graph maps):
    parity exits 1, stdout is JSON only."""
    from leanvlm.export import ExportOptions, export_engine
    from leanvlm.models import make_tiny

    other = make_tiny(tmp_path / "seed1", seed=1)
    donor = export_engine(ExportOptions(model=str(other), keep=0.33, out=tmp_path / "donor")).out
    bad = _swap_prefill(engines(0.33).out, donor, tmp_path / "bad", ("prefill.onnx", "weights.onnx.data"))
    code = main(["parity", str(bad), "--samples", "2", "--steps", "4", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the report on stdout (Polygraphy's log is on stderr)
    assert code == 1 and report["passed"] is False and report["polygraphy_passed"] is False
    assert report["logits_max_abs"] > 1e-2
    assert "FAILED" in captured.err


def test_parity_on_a_wrong_shape_engine_is_an_error(capsys, engines, tmp_path):
    """A prefill graph that keeps 32 tokens where the manifest says 21 is not a tolerance question."""
    bad = _swap_prefill(engines(0.33).out, engines(0.5).out, tmp_path / "bad")
    code = main(["parity", str(bad), "--samples", "1", "--steps", "4", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "graph and manifest do not match" in captured.err


def test_bench_reports_medians_and_ratios(capsys, engines):
    code = main(["bench", str(engines(0.33).out), "--baseline", str(engines(1.0).out), "--repeats", "2",
                 "--warmup", "0", "--new-tokens", "4", "--prompt-len", "20", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    eng, base, ratios = report["engine"], report["baseline"], report["ratios"]
    assert eng["prompt_tokens"] == base["prompt_tokens"] == 64 + eng["text_tokens"]
    assert abs(eng["text_tokens"] - 20) <= 3
    assert eng["prefill_s"]["n"] == 2 and eng["prefill_s"]["min"] <= eng["prefill_s"]["median"] <= eng["prefill_s"]["max"]
    assert eng["kv_cache"]["used_bytes"] < base["kv_cache"]["used_bytes"]
    assert ratios["kv_bytes_ratio"] < 1
    assert eng["theoretical_prefill_flops_ratio"] < 1 == base["theoretical_prefill_flops_ratio"]
    assert ratios["theoretical_prefill_speedup"] == pytest.approx(1 / eng["theoretical_prefill_flops_ratio"])


def test_make_tiny_cli(capsys, tmp_path):
    assert main(["make-tiny", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["make-tiny", str(tmp_path / "m")]) == 2
    assert "not empty" in capsys.readouterr().err
