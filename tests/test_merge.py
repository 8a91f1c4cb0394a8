"""The merge arithmetic of iLLaVA and VisionZip against small hand-computed examples."""

import torch

from leanvlm.reduction.merge import complement, contextual_targets, rank_weighted_merge, visionzip


def test_complement_is_ascending_and_exact():
    idx = torch.tensor([[4, 0, 2], [1, 5, 3]])
    assert complement(idx, 6).tolist() == [[1, 3, 5], [0, 2, 4]]


def test_rank_weighted_merge_by_hand():
    # 5 tokens, 1-d features equal to 10 * index; scores make token 3 lowest, then 1, then 4
    x = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0]]])
    scores = torch.tensor([[0.9, 0.2, 0.8, 0.1, 0.3]])
    out, kept, target = rank_weighted_merge(x, scores, r=2)
    # t0=3 (w 3), t1=1 (w 2), t2=4 (w 1): merged into token 4 = (3*30 + 2*10 + 1*40) / 6 = 25
    assert target.tolist() == [4]
    assert kept.tolist() == [[0, 2, 4]]  # tokens 3 and 1 deleted, order kept
    assert out[0, 4, 0].item() == 25.0
    assert out[0, [0, 1, 2, 3], 0].tolist() == [0.0, 10.0, 20.0, 30.0]  # others unchanged (deleted later)


def test_visionzip_by_hand():
    # 6 patches; CLS attention picks 2 dominant: tokens 5 and 1. Remaining 0,2,3,4 (M = 4); 2 contextual
    # targets at every M // C = 2nd position of the remainder from the first (VisionZip's arange(0, M, M // C))
    # -> tokens 0 and 3; others 2, 4 assigned by key.
    h = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]])
    cls = torch.tensor([[0.1, 0.5, 0.0, 0.1, 0.1, 0.9]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0], [1.0, 1.0]]])
    out, dom, targets = visionzip(h, cls, keys, dominant=2, contextual=2)
    assert dom.tolist() == [[1, 5]] and targets.tolist() == [[0, 3]]
    # token 2 (key ~ [1, 0]) joins target 0; token 4 (key [0, 1]) joins target 3
    assert out[0, :, 0].tolist() == [2.0, 6.0, 1.0 + 3.0, 4.0 + 5.0]


def test_visionzip_targets_follow_the_reference_stride():
    # LLaVA-1.5 at 54 + 10: 576 - 53 = 523 remaining patches, targets every 52nd from the first
    assert contextual_targets(523, 10).tolist() == list(range(0, 468 + 1, 52))
    assert contextual_targets(7, 3).tolist() == [0, 2, 4]


def test_visionzip_target_with_nothing_assigned_is_unchanged():
    h = torch.arange(1.0, 6.0).reshape(1, 5, 1)
    cls = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]])
    out, dom, targets = visionzip(h, cls, keys, dominant=1, contextual=2)
    # remaining 1,2,3,4 -> targets 1 and 3 (stride 2); others 2 and 4 both point like target 1
    assert targets.tolist() == [[1, 3]]
    assert out[0, :, 0].tolist() == [1.0, 2.0 + (3.0 + 5.0) / 2, 4.0]  # target 3 got nothing: unchanged
