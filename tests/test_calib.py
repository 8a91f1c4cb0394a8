"""Schedule search (leanvlm calib): resumed scoring is exact, G-Search and P-Sigmoid are deterministic and give
non-increasing counts within their budget, their files export to engines that pass parity, bad input exits 2,
and an interrupted search leaves no file. Small: shapes-llava, 16 calibration samples, a coarse count grid."""

import json
import os

import pytest

from leanvlm.calib import psigmoid as ps
from leanvlm.calib.gsearch import gsearch
from leanvlm.calib.run import SearchOptions, run_gsearch, run_psigmoid
from leanvlm.calib.scoring import Scorer, search_items
from leanvlm.calib.writer import write_schedule
from leanvlm.cli import main
from leanvlm.errors import UserError
from leanvlm.reduction.flops import prefill_flops_ratio
from leanvlm.reduction.schedule import Schedule

N = 16  # calibration samples: one sample is 1/16 of accuracy
MODEL = "shapes-llava"


@pytest.fixture(scope="module")
def shapes_model():
    from leanvlm.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def scorer(shapes_model):
    return Scorer(shapes_model, search_items("shapes", N), batch=N)


def _counts(schedule: Schedule) -> list[int]:
    return schedule.image_tokens_per_layer()


def test_resumed_scoring_equals_scoring_from_scratch(shapes_model, scorer):
    """Saved prefill states and the cached vision output change nothing, and they are used."""
    naive = Scorer(shapes_model, scorer.items, batch=N, reuse=False)
    L, n = scorer.num_layers, scorer.num_image_tokens
    candidates = [Schedule.fastv(L, n, 0.5, 2), Schedule.fastv(L, n, 0.25, 2), Schedule.fastv(L, n, 0.25, 1),
                  Schedule.pdrop(L, n, 0.3)]
    before = scorer.stats.layers_resumed
    for s in candidates:
        assert scorer.score(s) == naive.score(s)
    assert scorer.baseline == naive.baseline and scorer.baseline.kl == 0.0
    assert scorer.stats.layers_resumed > before  # the FastV candidates resumed from the unreduced run's states
    assert scorer.stats.vision_runs == 1 and naive.stats.vision_runs == len(candidates) + 1


def test_calibration_split_is_disjoint_from_evaluation():
    from leanvlm.eval.harness import shapes_items

    calib = {(i.question, i.image.tobytes()) for i in search_items("shapes", 64)}
    test = {(i.question, i.image.tobytes()) for i in shapes_items(64)}
    assert not calib & test


def test_metric_counts_gains_out_of_the_objective():
    from leanvlm.calib.scoring import Metric

    base = Metric(90, 100, 0.0)
    lucky = Metric(91, 100, 0.2, lost=4, baseline_correct=90)  # 4 answers broken, 5 fixed
    assert (base.gained, base.retained) == (0, 0.9)
    assert lucky.gained == 5 and lucky.retained == 0.86 and lucky.accuracy == 0.91
    assert lucky.objective < Metric(89, 100, 0.5, lost=1, baseline_correct=90).objective < base.objective


def test_gsearch_is_deterministic_with_non_increasing_counts(scorer):
    a = gsearch(scorer, tolerance=1 / N, steps=4)
    b = gsearch(scorer, tolerance=1 / N, steps=4)
    assert a.schedule == b.schedule and a.metric == b.metric
    counts = _counts(a.schedule)
    assert counts == sorted(counts, reverse=True)
    assert a.metric.lost <= 1 and a.metric.accuracy >= a.baseline.accuracy - 1 / N - 1e-9
    for c in a.candidates:  # accepted on answers lost, whatever a cut happened to fix
        assert c.passed == (c.metric.lost <= 1)
        assert c.metric.correct - c.metric.gained == a.baseline.correct - c.metric.lost
    assert all(s.num_keep < prev for s, prev in zip(a.schedule.stages, [counts[0], *[s.num_keep for s in a.schedule.stages]]))
    layers = [c.layer for c in a.candidates]  # shallow to deep, every layer until the grid's smallest count
    assert layers == sorted(layers) and layers[0] == 1
    grid_min = min(c.count for c in a.candidates)
    assert set(layers) == set(range(1, scorer.num_layers)) or counts[-1] == grid_min


def test_psigmoid_respects_the_budget_and_is_deterministic(scorer):
    cfg = scorer.model.model.config.text_config
    tt = scorer.text_tokens()
    for budget in (0.6, 0.45):
        a = ps.psigmoid(scorer, budget, trials=3, seed=0)
        b = ps.psigmoid(scorer, budget, trials=3, seed=0)
        assert a.schedule == b.schedule and [t.to_dict() for t in a.trials] == [t.to_dict() for t in b.trials]
        ratio = prefill_flops_ratio(a.schedule, tt, cfg.hidden_size, cfg.intermediate_size, 1.0)
        assert ratio <= budget + 1e-12 and ratio == pytest.approx(a.flops_ratio)
        counts = _counts(a.schedule)
        assert counts == sorted(counts, reverse=True) and counts[0] == scorer.num_image_tokens
        # a stage only where the count changes
        assert [s.layer for s in a.schedule.stages] == [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]


def test_sigmoid_curve_and_budget_fit():
    counts = ps.curve_counts(8, 144, k=10.0, x0=0.4, r_min=0.1)
    assert counts[0] == 144 and counts == sorted(counts, reverse=True) and counts[-1] >= round(144 * 0.1)
    assert ps.curve_counts(8, 144, k=10.0, x0=0.4, r_min=1.0) == [144] * 8
    flops = lambda s: prefill_flops_ratio(s, 20, 192, 384)  # noqa: E731
    r_min, x0, fitted = ps.fit_budget(8, 144, 10.0, 0.4, 0.5, flops)
    assert x0 == 0.4 and flops(ps.counts_schedule(fitted)) <= 0.5
    looser = ps.curve_counts(8, 144, 10.0, 0.4, min(1.0, r_min + 0.02))
    assert flops(ps.counts_schedule(looser)) > 0.5  # the largest floor that fits
    r_min, x0, fitted = ps.fit_budget(8, 144, 40.0, 0.95, 0.3, flops)  # drops too late: the centre moves earlier
    assert r_min == 0.0 and x0 < 0.95 and flops(ps.counts_schedule(fitted)) <= 0.3
    assert ps.fit_budget(8, 144, 0.5, 0.5, 0.3, flops) is None  # too gentle a slope to reach 0.3


def test_searched_schedule_exports_and_passes_parity(tmp_path):
    from leanvlm.export import ExportOptions, export_engine
    from leanvlm.runtime.parity import run_parity

    out = tmp_path / "g.yaml"
    opts = SearchOptions(model=MODEL, out=out, n=N, batch=N, tolerance=2 / N, steps=4)
    result, record = run_gsearch(opts)
    import yaml

    first = yaml.safe_load(out.read_text())
    assert Schedule.from_file(out, 4, 144).stages == result.schedule.stages
    search = first["search"]
    assert search["method"] == "gsearch" and search["n"] == N and search["tolerance"] == 2 / N
    assert {"data", "seed", "metric", "wall_time_s", "prefill_flops_ratio"} <= set(search)
    assert first["stages"], "a tolerance of two samples should allow some reduction on shapes-llava"
    engine = export_engine(ExportOptions(model=MODEL, schedule=out, out=tmp_path / "engine", max_batch=2))
    # the engine runs exactly the searched stages
    assert engine.manifest["schedule"]["stages"] == result.schedule.to_dict()["stages"]
    report = run_parity(engine.out, samples=2, steps=4)
    assert report.passed, report.to_dict()


@pytest.mark.parametrize("argv, message", [
    (["psigmoid", "--budget", "0"], "--budget 0.0"),
    (["psigmoid", "--budget", "1.5"], "--budget 1.5"),
    (["psigmoid", "--budget", "0.5", "--trials", "1"], "--trials 1"),
    (["gsearch", "--tolerance", "-0.1"], "--tolerance -0.1"),
    (["gsearch", "--tolerance", "0.01", "--n", "20"], "use --n >= 100"),
    (["gsearch", "--n", "4"], "--n 4"),
    (["gsearch", "--steps", "1"], "--steps 1"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    out = tmp_path / "s.yaml"
    assert main(["calib", *argv, "--model", MODEL, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_data_and_out_exit_2(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    from PIL import Image

    Image.new("RGB", (96, 96)).save(tmp_path / "x.png")
    data.write_text("\n".join(json.dumps({"image": "x.png", "question": "Is there a circle?"}) for _ in range(20)))
    out = tmp_path / "s.yaml"
    assert main(["calib", "gsearch", "--model", MODEL, "--data", str(data), "--n", "16", "--tolerance", "0",
                 "--out", str(out)]) == 2
    assert "missing answers" in capsys.readouterr().err
    data.write_text("\n".join(json.dumps({"image": "x.png", "question": "Is there a circle?", "answers": ["no"]})
                              for _ in range(10)))
    assert main(["calib", "gsearch", "--model", MODEL, "--data", str(data), "--n", "16", "--tolerance", "0",
                 "--out", str(out)]) == 2
    assert "10 samples, fewer than --n 16" in capsys.readouterr().err
    out.write_text("mine")
    assert main(["calib", "psigmoid", "--model", MODEL, "--budget", "0.5", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["calib", "psigmoid", "--model", MODEL, "--budget", "0.5", "--out", str(tmp_path / "no" / "s.yaml")]) == 2
    assert not out.with_name("no").exists()


def test_interrupted_search_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Scorer.score

    def interrupt_later(self, schedule):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, schedule)

    monkeypatch.setattr(Scorer, "score", interrupt_later)
    out = tmp_path / "s.yaml"
    code = main(["calib", "psigmoid", "--model", MODEL, "--n", str(N), "--batch", str(N), "--budget", "0.5",
                 "--trials", "4", "--out", str(out)])
    assert code == 130 and calls["n"] == 3
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "s.yaml"
    schedule = Schedule.fastv(4, 144, 0.5, 2)

    def broken(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_schedule(out, schedule, {"method": "gsearch"})
    assert os.listdir(tmp_path) == []


def test_search_record_must_be_a_mapping(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("search: 3\nstages: []\n")
    with pytest.raises(UserError, match="'search' must be a mapping"):
        Schedule.from_file(f, 4, 144)
    f.write_text("search: {method: gsearch}\nstages: [{layer: 2, keep: 72}]\n")
    assert Schedule.from_file(f, 4, 144).stages[0].num_keep == 72


def test_psigmoid_cli_writes_a_loadable_schedule(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["calib", "psigmoid", "--model", MODEL, "--n", str(N), "--batch", str(N), "--budget", "0.55",
                 "--trials", "3", "--out", str(out)]) == 0
    assert "trial   3/3" in capsys.readouterr().err
    import yaml

    doc = yaml.safe_load(out.read_text())
    assert doc["search"]["budget"] == 0.55 and doc["search"]["prefill_flops_ratio"] <= 0.55
    assert set(doc["search"]["curve"]) == {"k", "x0", "r_min"}
    assert Schedule.from_file(out, 4, 144).stages
    assert main(["plan", "--model", MODEL, "--schedule", str(out), "--json",
                 "--text-tokens", str(doc["search"]["flops_text_tokens"])]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["prefill_flops_ratio"] == pytest.approx(doc["search"]["prefill_flops_ratio"], abs=1e-6)
