import json

import pytest

from leanvlm.errors import UserError
from leanvlm.models import MODEL_ALIASES, load_model, make_tiny, resolve_model
from leanvlm.models.llava_config import num_image_tokens


def test_tiny_checkpoint_is_a_complete_hf_llava(tiny_dir, hf_model, processor):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    text = hf_model.config.text_config
    assert text.num_hidden_layers >= 4
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention
    assert num_image_tokens(hf_model.config) >= 64
    assert (tiny_dir / "model.safetensors").is_file()
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == hf_model.config.image_token_id
    assert tok.padding_side == "left"
    templ = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
    assert templ == "USER: <image>\nHi ASSISTANT:"
    assert tok.decode(tok("a red circle", add_special_tokens=False)["input_ids"]) == "a red circle"


def test_make_tiny_is_deterministic_and_refuses_non_empty_dir(tmp_path, tiny_dir):
    other = make_tiny(tmp_path / "again", seed=0)
    assert (other / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (make_tiny(tmp_path / "seed1", seed=1) / "model.safetensors").read_bytes() != \
        (tiny_dir / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="not empty"):
        make_tiny(tmp_path / "again")


def test_builtin_tiny_llava_is_made_once_in_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANVLM_CACHE", str(tmp_path))
    path = resolve_model("tiny-llava")
    assert path == tmp_path / "tiny-llava" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-llava") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_aliases_point_at_llava_hf():
    assert MODEL_ALIASES["llava-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert MODEL_ALIASES["llava-13b"] == "llava-hf/llava-1.5-13b-hf"


def test_offline_hub_model_error_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"llava-hf/llava-1.5-7b-hf.*not in the local.*local checkpoint directory"):
        resolve_model("llava-7b")


@pytest.mark.parametrize("name, message", [
    ("llava-99b", "not a known alias"),
    ("./no/such/dir", "no such directory"),
    ("", "empty"),
])
def test_bad_model_names(name, message):
    with pytest.raises(UserError, match=message):
        resolve_model(name)


def test_non_llava_checkpoint_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UserError, match="not supported"):
        resolve_model(str(tmp_path))


def test_load_model_from_local_dir(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert loaded.path == tiny_dir
    assert not loaded.model.training
