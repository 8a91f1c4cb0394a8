"""The reference model against Hugging Face's own LLaVA: it is the spec every engine is checked against."""

import torch
import pytest

from conftest import PROMPTS, chat, images
from leanvlm.reduction.schedule import Schedule
from leanvlm.reference import ReducedLlava
from leanvlm.reference.model import image_starts, prompt_positions


def _batch(processor, n):
    texts = [chat(processor, p) for p in PROMPTS[:n]]
    return processor(images=images(n), text=texts, return_tensors="pt", padding=True)


def _prefill(ref, enc):
    feats = ref.vision(enc["pixel_values"])[0]
    embeds = ref.embed(enc["input_ids"], feats)
    pos = prompt_positions(enc["attention_mask"])
    start = image_starts(enc["input_ids"], ref.image_token_id, ref.num_image_tokens)
    return ref.prefill(embeds, enc["attention_mask"], pos, start)[:3]


@pytest.mark.parametrize("n", [1, 3])
def test_unreduced_reference_matches_hf_logits(hf_model, processor, n):
    enc = _batch(processor, n)
    ref = ReducedLlava(hf_model, Schedule(4, 64, ()))
    with torch.no_grad():
        ours, presents, kept = _prefill(ref, enc)
        theirs = hf_model(**enc, position_ids=prompt_positions(enc["attention_mask"])).logits[:, -1]
    assert kept == []
    assert all(k.shape[2] == enc["input_ids"].shape[1] for k, _ in presents)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_embed_splice_matches_hf_masked_scatter(hf_model, processor):
    enc = _batch(processor, 3)
    ref = ReducedLlava(hf_model, Schedule(4, 64, ()))
    with torch.no_grad():
        feats = ref.vision(enc["pixel_values"])[0]
        hf_feats = hf_model.model.get_image_features(enc["pixel_values"]).pooler_output
        ours = ref.embed(enc["input_ids"], feats)
        emb = hf_model.get_input_embeddings()(enc["input_ids"])
        mask = (enc["input_ids"] == hf_model.config.image_token_id)[..., None]
        theirs = emb.masked_scatter(mask, torch.cat(list(hf_feats)))
    assert torch.allclose(feats, torch.stack(list(hf_feats)), atol=1e-6)
    assert torch.equal(ours, theirs)


def test_fastv_kept_indices_match_hf_eager_attention(tiny_dir, processor):
    """Kept = top-k of HF's own eager attention at layer K-1 (last row, head mean), beyond a tie margin."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    enc = _batch(processor, 3)
    n_img, checked = 64, 0
    for layer in (1, 2, 3):
        for keep in (0.33, 0.5):
            ref = ReducedLlava(eager, Schedule.fastv(4, n_img, keep, layer))
            k = ref.schedule.stages[0].num_keep
            with torch.no_grad():
                _, _, (kept,) = _prefill(ref, enc)
                att = eager(**enc, position_ids=prompt_positions(enc["attention_mask"]),
                            output_attentions=True).attentions[layer - 1]
            start = image_starts(enc["input_ids"], ref.image_token_id, n_img)
            margin = 1e-6
            for b in range(3):
                scores = att[b, :, -1].mean(0)[start[b]: start[b] + n_img]
                order = scores.sort(descending=True).values
                hi, lo = order[k - 1], order[k]
                must_keep = set((scores > hi + margin).nonzero().flatten().tolist())
                must_drop = set((scores < lo - margin).nonzero().flatten().tolist())
                got = set(kept[b].tolist())
                assert must_keep <= got and not (must_drop & got), (layer, keep, b)
                assert kept[b].tolist() == sorted(got)  # original order kept
                if hi - lo > margin:
                    assert got == set(scores.topk(k).indices.tolist())
                    checked += 1
    assert checked >= 9  # the comparison is not vacuous: most cuts have a clear gap


def test_fastv_reduces_cache_and_keeps_positions(hf_model, processor):
    enc = _batch(processor, 3)
    ref = ReducedLlava(hf_model, Schedule.fastv(4, 64, 0.33, 2))
    seq = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits, presents, (kept,) = _prefill(ref, enc)
    assert kept.shape == (3, 21)
    assert [k.shape[2] for k, _ in presents] == [seq, seq, seq - 64 + 21, seq - 64 + 21]
    assert torch.isfinite(logits).all()
    # reduced-mask rule used by the runtime: the prompt mask cut to the group length equals the gathered one
    from leanvlm.reduction import select

    start = image_starts(enc["input_ids"], ref.image_token_id, 64)
    index = select.keep_index(start, kept, seq, 64)
    gathered = select.gather_tokens(enc["attention_mask"], index)
    assert torch.equal(gathered, enc["attention_mask"][:, : seq - 64 + 21])
    positions = select.gather_tokens(prompt_positions(enc["attention_mask"]), index)
    assert (positions.diff(dim=1)[:, start.max():] >= 1).all()  # increasing, with gaps where tokens went
