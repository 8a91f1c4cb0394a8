"""The decode graph's own formulation (export.decode_graph) against the reference decode step, the graph's
structure (the cache is only read), and the onnxruntime backend's per-thread decode binding."""

import gc
import weakref

import numpy as np
import onnx
import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from leanvlm.errors import UserError
from leanvlm.export.decode_graph import DecodeGraph, rotation_matrix, split_attention
from leanvlm.reduction.schedule import Schedule
from leanvlm.reference import ReducedLlava
from leanvlm.reference.model import _attend
from leanvlm.spec import names


def test_rotation_matrix_is_rotate_half():
    x = torch.randn(3, 5, 16)
    assert torch.equal(x @ rotation_matrix(16), rotate_half(x))


def test_split_attention_equals_attention_over_the_joined_cache():
    """Grouped-query heads, unfilled (masked) slots and a left pad: the same output as concatenating the new
    entry to the past and attending over repeated KV heads, as the reference does."""
    g = torch.Generator().manual_seed(0)
    b, kv, rep, p, d = 2, 2, 3, 11, 8
    q = torch.randn(b, kv * rep, 1, d, generator=g)
    k, v = torch.randn(b, kv, 1, d, generator=g), torch.randn(b, kv, 1, d, generator=g)
    pk, pv = torch.randn(b, kv, p, d, generator=g), torch.randn(b, kv, p, d, generator=g)
    mask = torch.ones(b, p + 1, dtype=torch.int64)
    mask[:, 7:-1] = 0  # unfilled slots
    mask[1, :2] = 0  # left padding
    additive = ReducedLlava._decode_mask(mask)
    expect, _ = _attend(q, repeat_kv(torch.cat([pk, k], 2), rep), repeat_kv(torch.cat([pv, v], 2), rep), 0.3,
                        additive, False)
    got = split_attention((q * 0.3).view(b, kv, rep, d), k, v, pk, pv, additive)
    torch.testing.assert_close(got.reshape(b, kv * rep, 1, d), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_decode_step_matches_reference(hf_model, method):
    """The whole step in torch: logits and new KV of every layer, with PyramidDrop's per-group position offsets
    and ragged masks over partly filled buffers."""
    schedule = Schedule.preset(method, 4, 64, 0.5, 2, 3)
    ref = ReducedLlava(hf_model, schedule).eval()
    graph = DecodeGraph(ref).eval()
    g = torch.Generator().manual_seed(3)
    b, d = 2, hf_model.config.text_config.hidden_size
    lengths = [40 + 5 * gi for gi in range(len(schedule.groups))]
    masks = []
    for n in lengths:
        m = torch.zeros(b, n + 1, dtype=torch.int64)
        m[:, : n - 6] = 1
        m[0, :3] = 0
        m[:, -1] = 1
        masks.append(m)
    past = [tuple(torch.randn(b, ref.num_kv_heads, lengths[schedule.group_of(i)], ref.head_dim, generator=g)
                  for _ in range(2)) for i in range(ref.num_layers)]
    x = torch.randn(b, 1, d, generator=g)
    pos = torch.tensor([[57], [60]])
    with torch.no_grad():
        want_logits, want_kv = ref.decode(x, pos, masks, past)
        got_logits, got_kv = graph.step(x, pos, masks, past)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for (k, v), (wk, wv) in zip(got_kv, want_kv):
        torch.testing.assert_close(k, wk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, wv, rtol=1e-5, atol=1e-5)


def test_decode_graph_only_reads_the_cache(engines):
    """No Concat (or anything but the attention products) takes a past buffer, and no shape bookkeeping is
    left: the step costs the same whatever the buffer's capacity, apart from the attention itself."""
    model = onnx.load(str(engines(1.0).out / "decode.onnx"), load_external_data=False)
    past = set(names.past_names(4))
    consumers = {n.op_type for n in model.graph.node if past & set(n.input)}
    transposed = {o for n in model.graph.node if past & set(n.input) and n.op_type == "Transpose" for o in n.output}
    assert consumers <= {"MatMul", "Transpose"}
    assert {n.op_type for n in model.graph.node if transposed & set(n.input)} <= {"MatMul"}
    ops = [n.op_type for n in model.graph.node]
    assert "Shape" not in ops and "Neg" not in ops
    assert ops.count("Concat") == 4  # one per layer: the score rows of past and new entry


@pytest.fixture(scope="module")
def backend(engines):
    from leanvlm.runtime.backends.onnxruntime import OrtBackend
    from leanvlm.spec.manifest import load_engine_spec

    be = OrtBackend(load_engine_spec(engines(1.0).out), threads=1)
    yield be
    be.close()


def _cache(be, seed: int, length: int = 30, filled: int = 20):
    rng = np.random.default_rng(seed)
    m = be.spec.model
    past = [tuple(rng.standard_normal((1, m.num_kv_heads, length, m.head_dim)).astype(np.float32) for _ in range(2))
            for _ in range(m.num_layers)]
    mask = np.zeros((1, length + 1), np.int64)
    mask[:, :filled] = 1
    mask[:, -1] = 1
    return past, mask


def _fresh(be, embeds, pos, mask, past) -> np.ndarray:
    feed = {names.INPUTS_EMBEDS: embeds, names.POSITION_IDS: pos, names.decode_mask_name(0): mask,
            **dict(zip(names.past_names(len(past)), [t for kv in past for t in kv]))}
    return be.sessions["decode"].run([names.LOGITS], feed)[0]


def test_decode_binding_follows_arrays_and_in_place_writes(backend):
    """One binding per thread: alternating between two requests' caches rebinds, an in-place mask write is
    seen without rebinding, and every result equals a plain session run."""
    be = backend
    embeds = np.random.default_rng(9).standard_normal((1, 1, be.hidden)).astype(np.float32)
    pos = np.array([[20]], np.int64)
    a, b = _cache(be, 1), _cache(be, 2)
    for past, mask in (a, b, a):
        logits, new_kv = be.decode(embeds, pos, [mask], past)
        np.testing.assert_allclose(logits, _fresh(be, embeds, pos, mask, past), rtol=1e-5, atol=1e-5)
        assert new_kv[0][0].shape == (1, be.spec.model.num_kv_heads, 1, be.spec.model.head_dim)
    past, mask = a
    mask[:, 20] = 1  # the runtime's append: in place
    logits, _ = be.decode(embeds, pos, [mask], past)
    np.testing.assert_allclose(logits, _fresh(be, embeds, pos, mask, past), rtol=1e-5, atol=1e-5)
    # an int32 position is converted (a copy for this call only)
    logits32, _ = be.decode(embeds, pos.astype(np.int32), [mask], past)
    np.testing.assert_array_equal(logits32, logits)


def test_decode_binding_keeps_no_finished_cache_alive(backend):
    past, mask = _cache(backend, 4)
    backend.decode(np.zeros((1, 1, backend.hidden), np.float32), np.array([[20]], np.int64), [mask], past)
    alive = weakref.ref(past[0][0])
    del past, mask
    gc.collect()
    assert alive() is None


def test_token_rows_equal_the_embed_graph(backend):
    """Decode steps embed from the mapped table; the <image> token embeds to zeros as the graph's splice does,
    and ids out of range still go to the graph (which refuses them)."""
    be = backend
    image = be.spec.model.image_token_id
    ids = np.array([[7], [image], [be.spec.model.vocab_size - 1]], np.int64)
    feats = be.empty_features(3)
    graph = be._run("embed", {names.INPUT_IDS: ids, names.IMAGE_FEATURES: feats})[names.INPUTS_EMBEDS]
    assert be._tokens is not None
    np.testing.assert_array_equal(be.embed(ids, feats), graph)
    assert not be.embed(ids, feats)[1].any()
    assert be._tokens.lookup(np.array([[be.spec.model.vocab_size]])) is None
    with pytest.raises(Exception):
        be.embed(np.array([[be.spec.model.vocab_size]], np.int64), be.empty_features(1))


def test_prepack_option(engines):
    from leanvlm.runtime import Pipeline

    with pytest.raises(UserError, match="prepack"):
        Pipeline.load(engines(1.0).out, prepack="all")


def test_prepack_default_packs_decode_only_where_it_fits(engines, monkeypatch):
    """Float engines prepack the decode session by default (prefill reads the mapped weights); low_memory, an
    explicit choice, or a machine too small for the packed copy keep every session unpacked."""
    from leanvlm.runtime.backends import onnxruntime as ortb
    from leanvlm.spec.manifest import load_engine_spec

    spec = load_engine_spec(engines(1.0).out)
    packed = lambda be, g: be.sessions[g].get_session_options().get_session_config_entry(  # noqa: E731
        "session.disable_prepacking") == "0"
    monkeypatch.delenv("LEANVLM_ORT_PREPACK", raising=False)
    be = ortb.OrtBackend(spec, threads=1)
    assert be.prepack == "decode" and packed(be, "decode") and not packed(be, "prefill")
    for kwargs in ({"low_memory": True}, {"prepack": False}):
        be = ortb.OrtBackend(spec, threads=1, **kwargs)
        assert not packed(be, "decode") and not packed(be, "prefill")
    monkeypatch.setattr(ortb.os, "sysconf", lambda name: 1024 if name == "SC_PHYS_PAGES" else 4096)  # 4 MiB
    be = ortb.OrtBackend(spec, threads=1)
    assert be.prepack is None and not packed(be, "decode")


def test_cache_writes_row_by_row_equal_the_batched_write(backend):
    """KVCache.append writes a few rows one by one and many rows with one indexed write: the same buffers,
    masks and lengths either way (rows of different lengths, a hole included)."""
    from leanvlm.runtime.kv_cache import KVCache

    m = backend.spec.model
    rng = np.random.default_rng(3)
    caches = []
    for row_writes in (KVCache.ROW_WRITES, 0):
        cache = KVCache(backend.spec, 3, backend.alloc)
        cache.ROW_WRITES = row_writes
        for width, real in ((12, 9), (12, 12), (12, 5)):
            mask = np.zeros((1, width), np.int64)
            mask[:, width - real:] = 1
            presents = [tuple(np.ones((1, m.num_kv_heads, width, m.head_dim), np.float32) for _ in range(2))
                        for _ in range(m.num_layers)]
            cache.admit(presents, mask, [4])
        cache.release(1)
        caches.append(cache)
    for _ in range(3):
        new = [tuple(rng.standard_normal((3, m.num_kv_heads, 1, m.head_dim)).astype(np.float32) for _ in range(2))
               for _ in range(m.num_layers)]
        for cache in caches:
            cache.append(new)
    a, b = caches
    assert a.rows == 3 and a.lengths[:, 0].tolist() == [12, 0, 8]
    np.testing.assert_array_equal(a.lengths, b.lengths)
    for x, y in zip(a.keys + a.values + a.masks, b.keys + b.values + b.masks):
        np.testing.assert_array_equal(x, y)
