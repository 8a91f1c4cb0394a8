import numpy as np
import pytest
from PIL import Image

from leanvlm import Pipeline
from leanvlm.cli import main
from leanvlm.errors import UserError
from leanvlm.runtime.viz import DROPPED, KEPT, MERGED, patch_states, render


def test_patch_states_track_drops_and_merges():
    states = patch_states(6, [[0, 1, 2, 4], [1, 4], [4]], [False, True, False])
    assert states[0].tolist() == [KEPT, KEPT, KEPT, DROPPED, KEPT, DROPPED]
    assert states[1].tolist() == [MERGED, KEPT, MERGED, DROPPED, KEPT, DROPPED]  # earlier fate is kept
    assert states[2].tolist() == [MERGED, DROPPED, MERGED, DROPPED, KEPT, DROPPED]


@pytest.mark.parametrize("method", ["fastv", "illava"])
def test_viz_draws_one_panel_per_stage(engines, tmp_path, method):
    out = engines(0.33, method=method).out
    img = Image.new("RGB", (64, 64), (250, 250, 250))  # a bright image: darkened patches must show
    path = tmp_path / "kept.png"
    pipe = Pipeline.load(out)
    render(pipe, img, "Hi", path)
    picture = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    stages = len(pipe.schedule.vision_stages) + len(pipe.schedule.stages)
    assert picture.shape[1] == pytest.approx(3.2 * (stages + 1) * 110, abs=2)
    # the stage panels hold darkened (dropped) or tinted (merged) patches: darker than the input panel
    width = picture.shape[1] / (stages + 1)
    band = picture[int(picture.shape[0] * 0.3): int(picture.shape[0] * 0.8)]
    first = band[:, int(width * 0.2): int(width * 0.8)].mean()
    last = band[:, int(width * (stages + 0.2)): int(width * (stages + 0.8))].mean()
    assert last < first - 20


def test_viz_cli_and_bad_out(capsys, engines, tmp_path):
    img = tmp_path / "i.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(img)
    out = engines(0.33).out
    assert main(["viz", str(out), "--image", str(img), "--prompt", "Hi", "--out", str(tmp_path / "k.png")]) == 0
    assert (tmp_path / "k.png").stat().st_size > 1000
    assert main(["viz", str(out), "--image", str(img), "--prompt", "Hi", "--out", str(tmp_path / "k.jpg")]) == 2
    assert main(["viz", str(out), "--image", str(img), "--prompt", "Hi", "--out", str(tmp_path / "no" / "k.png")]) == 2
    with pytest.raises(UserError, match="no such file"):
        render(Pipeline.load(out), tmp_path / "missing.png", "Hi", tmp_path / "x.png")
