"""`leanvlm viz`: the image as the model saw it, with each stage's kept tokens on the patch grid.

One panel per stage. Kept patches are shown as they are; patches a drop stage removed are darkened;
patches merged into another token (iLLaVA, VisionZip) are tinted blue; the tokens that absorbed them are
outlined in orange.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from leanvlm.errors import UserError

DROPPED, MERGED, KEPT = 0, 1, 2


def patch_states(num_patches: int, kept: list[list[int]], merges: list[bool]) -> list[np.ndarray]:
    """Per stage, the state of every original patch: KEPT, MERGED (into a kept token) or DROPPED."""
    state = np.full(num_patches, KEPT)
    out = []
    for survivors, is_merge in zip(kept, merges):
        alive = np.zeros(num_patches, bool)
        alive[[p for p in survivors if p >= 0]] = True  # -1: the CLS token (VisionZip keep_cls), no patch
        state = np.where((state == KEPT) & ~alive, MERGED if is_merge else DROPPED, state)
        out.append(state.copy())
    return out


def seen_image(pipe, image) -> np.ndarray:
    """The image after the processor's resize, crop and normalisation, undone for display: [H, W, 3] in [0, 1]."""
    batch = pipe.preprocess([image], ["describe"])
    transform = pipe.processor.image_transform
    mean, std = transform.mean[:, None, None], transform.std[:, None, None]
    return np.clip((batch.pixel_values[0] * std + mean).transpose(1, 2, 0), 0, 1)


def render(pipe, image, prompt: str, out: str | Path) -> Path:
    """Write the kept-token figure for one request to `out` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: write a .png file")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    res = pipe.generate(image=image, prompt=prompt, max_new_tokens=1)
    schedule = pipe.schedule
    stages = [*schedule.vision_stages, *schedule.stages]
    n = schedule.num_image_tokens
    side = int(round(n ** 0.5))
    if side * side != n:
        raise UserError(f"viz needs a square patch grid; this model has {n} image tokens")
    picture = seen_image(pipe, image)
    cell = picture.shape[0] / side
    states = patch_states(n, res.kept, [st.merges for st in stages])
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3.2 * (len(stages) + 1), 3.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(picture)
    axes[0].set_title(f"input ({n} tokens)", fontsize=9)
    for ax, st, state, merged in zip(axes[1:], stages, states, res.merged):
        ax.imshow(picture)
        shade = np.zeros((side, side, 4), np.float32)
        flat = state.reshape(side, side)
        shade[flat == DROPPED] = (0, 0, 0, 0.75)
        shade[flat == MERGED] = (0.1, 0.35, 1.0, 0.55)
        ax.imshow(shade, extent=(0, picture.shape[1], picture.shape[0], 0), interpolation="nearest")
        for p in merged:
            r, c = divmod(p, side)
            ax.add_patch(Rectangle((c * cell, r * cell), cell, cell, fill=False, edgecolor="orange", linewidth=1.5))
        ax.set_title(_stage_title(st, int((state == KEPT).sum())), fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{prompt[:60]} - dark: dropped, blue: merged away, orange: merged into", fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _stage_title(stage, kept: int) -> str:
    if getattr(stage, "kind", "") == "vit_merge":
        return f"ViT layer {stage.layer} merge: {kept} kept"
    if getattr(stage, "kind", "") == "visionzip":
        return f"VisionZip: {kept - stage.contextual} + {stage.contextual} ctx" + (" + CLS" if stage.keep_cls else "")
    return f"LLM layer {stage.layer} {stage.action}: {kept} kept"
