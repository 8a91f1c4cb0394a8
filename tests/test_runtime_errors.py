"""Bad input to the runtime: a clear error, nothing crashes, and the same Pipeline serves the next request."""

import io
import json

import pytest
from PIL import Image

from conftest import images
from leanvlm import Pipeline
from leanvlm.errors import EngineError, UserError


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.load(engines(0.33, max_prompt=120, max_new_tokens=40, max_batch=3).out)


@pytest.fixture(scope="module")
def good(pipe):
    img = images(1)[0]
    return img, pipe.generate(image=img, prompt="Hi", max_new_tokens=8).token_ids


def _png_bytes(size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    images(1)[0].resize(size).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)  # ~ 18 KB on disk, 144 megapixels decoded
    return path


def _truncated(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_png_bytes((64, 64))[:200])
    return path


def _not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a png")
    return path


BAD_REQUESTS = {
    "missing image file": (lambda t: dict(image=t / "nope.png", prompt="Hi"), "no such file"),
    "unreadable image": (lambda t: dict(image=_not_an_image(t), prompt="Hi"), "not a readable image"),
    "truncated image": (lambda t: dict(image=_truncated(t), prompt="Hi"), "could not be decoded"),
    "truncated bytes": (lambda t: dict(image=_png_bytes((64, 64))[:150], prompt="Hi"), "could not be decoded|not a readable"),
    "decompression bomb": (lambda t: dict(image=_bomb(t), prompt="Hi"), "decompression-bomb guard"),
    "wrong image type": (lambda t: dict(image=12, prompt="Hi"), "expected a path, bytes or a PIL image"),
    "empty prompt": (lambda t: dict(image=images(1)[0], prompt="  "), "non-empty"),
    "prompt too long": (lambda t: dict(image=images(1)[0], prompt="shape " * 80), "exceeds this engine's limit of 120"),
    "batch too large": (lambda t: dict(images=images(4), prompts=["Hi"] * 4), "batch of 4 exceeds"),
    "mismatched batch": (lambda t: dict(images=images(2), prompts=["Hi"]), "2 images for 1 prompts"),
    "max_new_tokens beyond capacity": (lambda t: dict(image=images(1)[0], prompt="Hi", max_new_tokens=41), "limit of 40"),
    "max_new_tokens zero": (lambda t: dict(image=images(1)[0], prompt="Hi", max_new_tokens=0), "positive integer"),
    "negative temperature": (lambda t: dict(image=images(1)[0], prompt="Hi", temperature=-1.0), "temperature"),
    "nan temperature": (lambda t: dict(image=images(1)[0], prompt="Hi", temperature=float("nan")), "temperature"),
    "top_p zero": (lambda t: dict(image=images(1)[0], prompt="Hi", top_p=0.0), "top_p"),
    "top_k negative": (lambda t: dict(image=images(1)[0], prompt="Hi", top_k=-3), "top_k"),
    "bad seed": (lambda t: dict(image=images(1)[0], prompt="Hi", seed="x"), "seed"),
    "unknown option": (lambda t: dict(image=images(1)[0], prompt="Hi", beams=4), "unknown generation option"),
    "two image tokens": (lambda t: dict(image=images(1)[0], prompt="<image> and <image>"), "exactly one <image>"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_then_good_request(pipe, good, tmp_path, case):
    make, message = BAD_REQUESTS[case]
    with pytest.raises(UserError, match=message):
        pipe.generate(**make(tmp_path))
    img, expected = good
    assert pipe.generate(image=img, prompt="Hi", max_new_tokens=8).token_ids == expected


def test_image_inputs_path_bytes_pil_agree(pipe, tmp_path):
    img = images(1)[0]
    path = tmp_path / "x.png"
    img.save(path)
    a = pipe.generate(image=img, prompt="Hi", max_new_tokens=6).token_ids
    assert pipe.generate(image=path, prompt="Hi", max_new_tokens=6).token_ids == a
    assert pipe.generate(image=path.read_bytes(), prompt="Hi", max_new_tokens=6).token_ids == a
    assert pipe.generate(image=str(path), prompt="Hi", max_new_tokens=6).token_ids == a


def test_templated_prompt_is_used_as_is(pipe):
    img = images(1)[0]
    plain = pipe.generate(image=img, prompt="Hi", max_new_tokens=6)
    templated = pipe.generate(image=img, prompt="USER: <image>\nHi ASSISTANT:", max_new_tokens=6)
    assert plain.prompt_token_ids == templated.prompt_token_ids and plain.token_ids == templated.token_ids


def test_tampered_engine_refused(engine_copy):
    data = bytearray((engine_copy / "decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine_copy / "decode.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="decode.onnx: sha256 mismatch"):
        Pipeline.load(engine_copy)


def test_missing_engine_file_refused(engine_copy):
    (engine_copy / "vision.onnx").unlink()
    with pytest.raises(EngineError, match="vision.onnx: missing"):
        Pipeline.load(engine_copy)


def test_unknown_schema_refused(engine_copy):
    m = json.loads((engine_copy / "leanvlm.json").read_text())
    m["schema_version"] = 2
    (engine_copy / "leanvlm.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="schema version 2"):
        Pipeline.load(engine_copy)


def test_unknown_backend(engines):
    with pytest.raises(UserError, match="backend 'tensorflow'"):
        Pipeline.load(engines(0.33).out, backend="tensorflow")


def test_torch_backend_refuses_a_different_checkpoint(engines, tmp_path):
    from leanvlm.models import make_tiny

    other = make_tiny(tmp_path / "other", seed=0, text_intermediate=96)
    with pytest.raises(EngineError, match="config hash differs"):
        Pipeline.load(engines(0.33).out, backend="torch", model_path=other)
