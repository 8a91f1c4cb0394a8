import json

import pytest

from leanvlm.errors import EngineError
from leanvlm.spec.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest as load_manifest, sha256_file


def test_manifest_describes_the_export(engines):
    m = load_manifest(engines(0.33).out)
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["schedule"]["stages"][0] == {"layer": 2, "keep": 21 / 64, "num_keep": 21, "kind": "llm",
                                          "score_at": "previous", "positions": "keep", "action": "drop",
                                          "score": "last_token"}
    assert m["schedule"]["method"] == "fastv" and m["schedule"]["keep"] == 0.33
    assert len(m["source"]["config_sha256"]) == 64
    assert set(m["versions"]) >= {"leanvlm", "torch", "transformers", "onnx", "onnxruntime"}
    assert m["limits"] == {"max_batch": 8, "max_prompt": 64 + 512, "max_new_tokens": 256}
    assert [g["capacity"] for g in m["cache_groups"]] == [576 + 256, 576 - 43 + 256]
    names = [i["name"] for i in m["graphs"]["decode"]["inputs"]]
    assert names[:4] == ["inputs_embeds", "position_ids", "attention_mask.0", "attention_mask.1"]
    assert names[4:6] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert {"tokenizer.json", "processor_config.json", "prefill.onnx"} <= set(m["files"])
    for rel, digest in m["files"].items():
        assert sha256_file(engines(0.33).out / rel) == digest


def test_tampered_file_is_detected(engine_copy):
    with open(engine_copy / "prefill.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match=r"prefill\.onnx: sha256 mismatch"):
        load_manifest(engine_copy)


def test_missing_file_is_detected(engine_copy):
    (engine_copy / "decode.onnx").unlink()
    with pytest.raises(EngineError, match=r"decode\.onnx: missing"):
        load_manifest(engine_copy)


def test_unknown_schema_version_is_refused(engine_copy):
    path = engine_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(EngineError, match="schema version 99 is not supported"):
        load_manifest(engine_copy)


def test_manifest_paths_cannot_escape_the_directory(engine_copy):
    path = engine_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["files"]["../outside"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(EngineError, match="leaves the engine directory"):
        load_manifest(engine_copy)


def test_not_an_engine_directory(tmp_path):
    with pytest.raises(EngineError, match="no leanvlm.json"):
        load_manifest(tmp_path)
    with pytest.raises(EngineError, match="no such engine directory"):
        load_manifest(tmp_path / "nope")
