"""The Pipeline over exported engines: parity with Hugging Face and with the torch reference, KV cache,
streaming and sampling."""

import threading

import pytest
import torch

from conftest import PROMPTS, chat, images
from leanvlm import Pipeline


@pytest.fixture(scope="module")
def full_pipe(engines):
    return Pipeline.load(engines(1.0).out)


@pytest.fixture(scope="module")
def reduced(engines):
    out = engines(0.33).out
    return Pipeline.load(out), Pipeline.load(out, backend="torch")


def _hf_greedy(hf_model, processor, imgs, prompts, steps):
    texts = [chat(processor, p) for p in prompts]
    enc = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf_model.generate(**enc, max_new_tokens=steps, do_sample=False)
    eos = hf_model.generation_config.eos_token_id
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("n", [1, 3])
def test_unreduced_engine_matches_hf_generate(full_pipe, hf_model, processor, n):
    imgs, prompts = images(n), PROMPTS[:n]
    expected = _hf_greedy(hf_model, processor, imgs, prompts, 32)
    results = full_pipe.generate(images=imgs, prompts=prompts, max_new_tokens=32)
    assert [r.token_ids for r in results] == expected
    assert all(len(t) == 32 or t[-1] == hf_model.generation_config.eos_token_id for t in expected)
    assert len({tuple(t) for t in expected}) == n  # distinct requests, not one sequence repeated


def test_reduced_engine_matches_torch_reference(reduced, engines):
    ort_pipe, torch_pipe = reduced
    imgs = images(3)
    a = ort_pipe.generate(images=imgs, prompts=PROMPTS, max_new_tokens=32, ignore_eos=True)
    b = torch_pipe.generate(images=imgs, prompts=PROMPTS, max_new_tokens=32, ignore_eos=True)
    groups = engines(0.33).manifest["cache_groups"]
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and len(x.token_ids) == 32
        assert x.kept == y.kept and len(x.kept[0]) == 21
        assert x.kept[0] == sorted(set(x.kept[0])) and max(x.kept[0]) < 64
    # KV lengths per stage: the request's own prompt length (its batch pads are not cached) minus the dropped
    # image tokens, plus the 31 decoded entries
    for r in a:
        seq = len(r.prompt_token_ids)
        assert r.kv_cache["lengths"] == [seq - (64 - g["image_tokens"]) + 31 for g in groups]
    assert a[0].kv_cache["saved_bytes"] > 0
    assert a[0].kv_cache["used_bytes"] < a[0].kv_cache["unreduced_bytes"]


def test_batch_rows_equal_single_requests(reduced):
    pipe = reduced[0]
    imgs = images(3)
    batch = pipe.generate(images=imgs, prompts=PROMPTS, max_new_tokens=12)
    for img, prompt, row in zip(imgs, PROMPTS, batch):
        solo = pipe.generate(image=img, prompt=prompt, max_new_tokens=12)
        assert solo.token_ids == row.token_ids and solo.kept == row.kept and solo.text == row.text


def test_result_fields(reduced):
    res = reduced[0].generate(image=images(1)[0], prompt="Hi", max_new_tokens=5)
    assert res.prompt_token_ids.count(res.prompt_token_ids[4]) >= 64  # image tokens expanded
    assert len(res.token_ids) <= 5 and res.finish_reason in ("eos", "length")
    t = res.timings
    assert t["ttft_s"] > 0 and t["prefill_s"] > 0 and t["ttft_s"] >= t["prefill_s"]
    d = res.to_dict()
    assert set(d) >= {"prompt_token_ids", "token_ids", "text", "kept", "timings"}


def test_stream_equals_generate(reduced):
    pipe = reduced[0]
    img = images(1)[0]
    for kwargs in ({}, {"stop": ["colour"]}, {"temperature": 0.9, "seed": 3}):
        pieces = list(pipe.stream(img, PROMPTS[1], max_new_tokens=24, **kwargs))
        res = pipe.generate(image=img, prompt=PROMPTS[1], max_new_tokens=24, **kwargs)
        assert "".join(pieces) == res.text
        assert len(pieces) > 1


def test_stop_string_truncates(reduced):
    pipe = reduced[0]
    img = images(1)[0]
    full = pipe.generate(image=img, prompt=PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    res = pipe.generate(image=img, prompt=PROMPTS[0], max_new_tokens=24, stop=[stop])
    assert res.finish_reason == "stop" and stop not in res.text and full.text.startswith(res.text)


def test_seeded_sampling_is_reproducible(reduced):
    pipe = reduced[0]
    img = images(1)[0]
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    a = pipe.generate(image=img, prompt="Hi", seed=1, **kw)
    b = pipe.generate(image=img, prompt="Hi", seed=1, **kw)
    c = pipe.generate(image=img, prompt="Hi", seed=2, **kw)
    greedy = pipe.generate(image=img, prompt="Hi", max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids and a.token_ids != greedy.token_ids


def test_top_k_one_is_greedy(reduced):
    pipe = reduced[0]
    img = images(1)[0]
    greedy = pipe.generate(image=img, prompt="Hi", max_new_tokens=10)
    sampled = pipe.generate(image=img, prompt="Hi", max_new_tokens=10, temperature=2.0, top_k=1, seed=0)
    assert sampled.token_ids == greedy.token_ids


def test_concurrent_calls_match_sequential(reduced):
    pipe = reduced[0]
    imgs = images(3)
    jobs = [(imgs[i % 3], PROMPTS[i % 3]) for i in range(6)]
    expected = [pipe.generate(image=im, prompt=p, max_new_tokens=16).token_ids for im, p in jobs]
    got = [None] * len(jobs)
    errors = []

    def work(idxs):
        try:
            for i in idxs:
                got[i] = pipe.generate(image=jobs[i][0], prompt=jobs[i][1], max_new_tokens=16).token_ids
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(k, 6, 2),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def test_memory_sampler_splits_anon_and_counts_a_twice_mapped_file_once(tmp_path):
    """Engines map one weights file from two sessions: the benchmark's memory must count those pages once
    (PSS), and tell anonymous memory (copies) from mapped file pages."""
    import mmap

    import numpy as np

    from leanvlm.runtime.bench import MemorySampler, memory_now

    if not memory_now():
        pytest.skip("no /proc/self/smaps_rollup on this platform")
    size = 96 << 20
    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    with MemorySampler(interval=0.01) as mem, open(path, "rb") as f:
        base = memory_now()
        maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for _ in range(2)]
        touched = [sum(m[i] for i in range(0, size, 4096)) for m in maps]  # every page of both maps
        mem.sample()
        after_maps = memory_now()
        copy = np.ones(size, dtype=np.uint8)  # an anonymous copy of the same size
        mem.sample()
        del copy
        for m in maps:
            m.close()
    assert touched[0] == touched[1]
    file_growth = after_maps["file"] - base["file"]
    assert 0.9 * size < file_growth < 1.2 * size, file_growth  # once, not twice
    assert mem.peak["anon"] - base["anon"] > 0.9 * size
    assert mem.peak["total"] >= base["anon"] + base["file"] + size
