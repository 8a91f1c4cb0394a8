"""Adaptive token pruning in the style of ATP-LLaVA (arXiv 2412.00447): a small learned module per adaptive stage
predicts, per sample, how many image tokens the rest of the decoder needs.

What the module computes at the input of decoder layer L (our reading of the paper, adapted to an engine; see
docs/ARCHITECTURE.md "Adaptive stages" for what differs from the paper):

- importance: the last prompt token's head-mean attention over the image tokens at layer L-1 (the text-to-vision
  row FastV uses; the paper's cross-modality score), renormalised over the tokens still valid and taken as
  log(n * p), so 0 means "uniform";
- redundancy: each image token's largest cosine similarity to another valid image token (hidden states at the
  input of layer L); a token with a near-copy can go;
- token score s_j = importance_j - w * redundancy_j, w learned;
- threshold: theta = MLP([rms(h_last), rms(mean of the image tokens)]), per sample: the question (in the last
  token's state) and the image decide it;
- count = clamp(spatial + #{non-spatial valid j: s_j > theta}, min, cap); spatial augmented pruning (SAP) always
  keeps `spatial` tokens on a uniform grid of the image, so position information survives at any count.

The kept set of a sample is its `count` best tokens (spatial ones first, then by score); the graph takes TopK with
K = the batch's largest count (or K = cap with `static`) and masks each sample's slots beyond its own count, in
attention and in the KV-cache masks. Training (tools/train_atp.py) replaces the hard count by the soft mask
sigmoid((s - theta) / tau), applied as a log-mask on the attention keys of every later layer, with the decoder
frozen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from leanvlm.errors import UserError

ATP_WEIGHTS = "atp.safetensors"
ATP_RECORD = "atp.json"
HEAD_WIDTH = 32
_BIG = 1.0e4  # rank offset: spatial tokens above every score, invalid ones below (|scores| << 1e4)


class ATPModule(nn.Module):
    """Token scores and a per-sample threshold for one adaptive stage (see the module docstring)."""

    def __init__(self, hidden_size: int, width: int = HEAD_WIDTH):
        super().__init__()
        self.hidden_size = hidden_size
        self.head = nn.Sequential(nn.Linear(2 * hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        self.redundancy_weight = nn.Parameter(torch.tensor(1.0))

    def token_scores(self, attention: torch.Tensor, image_h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """attention [B, n] (last-token probabilities over the image tokens), image_h [B, n, d], valid [B, n]
        (bool) -> scores [B, n], float32."""
        v = valid.to(torch.float32)
        p = attention.float() * v
        n_valid = v.sum(1, keepdim=True)
        importance = torch.log(p / p.sum(1, keepdim=True).clamp_min(1e-12) * n_valid + 1e-6)
        x = image_h.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))  # not ReduceL2 (TensorRT allowlist)
        sim = torch.matmul(x, x.transpose(1, 2))
        n = sim.shape[1]
        idx = torch.arange(n, device=sim.device)
        usable = (v[:, None, :] > 0) & (idx[:, None] != idx[None, :])[None]  # not EyeLike: no bool kernel in ORT
        redundancy = torch.where(usable, sim, torch.full_like(sim, -1.0)).max(dim=2).values
        return importance - self.redundancy_weight * redundancy

    def threshold(self, last_h: torch.Tensor, image_h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-sample threshold [B] from the last prompt token's state and the mean valid image token."""
        v = valid.to(torch.float32)[..., None]
        pooled = (image_h.float() * v).sum(1) / v.sum(1).clamp_min(1.0)
        feats = torch.cat([_rms(last_h.float()), _rms(pooled)], dim=-1)
        return self.head(feats)[:, 0]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def spatial_indices(n: int, count: int) -> list[int]:
    """`count` image-token indices spread uniformly over the image: the centres of a g x g grid of cells when
    both n and count are squares (9 of 144: the centres of a 3 x 3 grid of 4 x 4 patches), else evenly strided."""
    if count <= 0:
        return []
    side, g = math.isqrt(n), math.isqrt(count)
    if side * side == n and g * g == count and g <= side:
        centres = [int((i + 0.5) * side / g) for i in range(g)]
        return [r * side + c for r in centres for c in centres]
    return sorted({min(n - 1, int((i + 0.5) * n / count)) for i in range(count)})


def spatial_flags(n: int, count: int) -> torch.Tensor:
    """[n] bool: which original image tokens SAP always keeps."""
    flags = torch.zeros(n, dtype=torch.bool)
    flags[spatial_indices(n, count)] = True
    return flags


def counts(scores: torch.Tensor, theta: torch.Tensor, valid: torch.Tensor, spatial: torch.Tensor,
           min_keep: int, cap: int) -> torch.Tensor:
    """Per-sample kept count [B]: the spatial tokens plus the valid others above the threshold, clamped to
    [min, cap] and to the tokens still valid."""
    free = valid & ~spatial
    above = ((scores > theta[:, None]) & free).to(torch.int64).sum(1)
    n_spatial = (valid & spatial).to(torch.int64).sum(1)
    count = (above + n_spatial).clamp(min_keep, cap)
    return torch.minimum(count, valid.to(torch.int64).sum(1))


def select(scores: torch.Tensor, count: torch.Tensor, valid: torch.Tensor, spatial: torch.Tensor,
           cap: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Take each sample's `count` best tokens: TopK with K = cap (static) or the batch's largest count (an
    in-graph scalar), then ascending index order. Returns kept [B, K] (indices into the current image tokens) and
    slot_valid [B, K] (False for the slots beyond the sample's own count: masked, not removed)."""
    n = scores.shape[1]
    idx = torch.arange(n, device=scores.device, dtype=torch.float32)[None]
    # distinct ranks: spatial tokens first, then by score, invalid ones last in index order (no ties to break
    # differently in ONNX Runtime and PyTorch)
    rank = torch.where(valid & spatial, _BIG - idx, torch.where(valid, scores, -_BIG - idx))
    if static:
        k = min(cap, n)
    else:
        # K as a 0-d tensor built from a shape, so the trace keeps it data-dependent (TopK's K input)
        k = (torch.arange(n, device=scores.device) < count.max()).to(torch.int64).sum()
    top = torch.topk(rank, k, dim=1)
    slot_ok = torch.arange(top.indices.shape[1], device=scores.device)[None] < count[:, None]
    # ascending index order: a second TopK on the float indices (as select.select_top), carrying validity along
    width = k if static else top.indices.shape[1]  # static: a constant K here too (no Shape-derived K)
    ordered = torch.topk(top.indices.to(torch.float32), width, dim=1, largest=False)
    return ordered.values.to(torch.int64), torch.gather(slot_ok, 1, ordered.indices)


def soft_keep(scores: torch.Tensor, theta: torch.Tensor, valid: torch.Tensor, spatial: torch.Tensor,
              tau: float) -> torch.Tensor:
    """Training's differentiable keep mask [B, n] in (0, 1]: sigmoid((s - theta) / tau), 1 for spatial tokens,
    0 for invalid ones."""
    m = torch.sigmoid((scores - theta[:, None]) / tau)
    return torch.where(spatial, torch.ones_like(m), m) * valid.to(m.dtype)


# ---- files -----------------------------------------------------------------------------------------------
def save_atp(directory: str | Path, modules: dict[int, ATPModule], record: dict) -> None:
    """Write atp.safetensors (one module per stage layer, `layers.{L}.` prefixes) and the atp.json record, each
    through a temporary sibling and a rename."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {f"layers.{layer}.{k}": v.detach().cpu().contiguous() for layer, m in modules.items()
               for k, v in m.state_dict().items()}
    tmp = directory / f".{ATP_WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    tmp.chmod(0o644)  # shipped with the checkpoint: as readable as its other files
    tmp.replace(directory / ATP_WEIGHTS)
    tmp = directory / f".{ATP_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(directory / ATP_RECORD)


def read_record(directory: str | Path) -> dict:
    """The atp.json training record of a checkpoint directory (UserError when there is none)."""
    path = Path(directory) / ATP_RECORD
    if not path.is_file():
        raise UserError(f"{directory}: no trained ATP modules ({ATP_RECORD}); train them with tools/train_atp.py "
                        "or choose another method")
    try:
        record = json.loads(path.read_text())
        _ = [(int(s["layer"]), int(s["cap"]), int(s["min"]), int(s["spatial"])) for s in record["stages"]]
        int(record["hidden_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an ATP record ({type(e).__name__}: {e})") from e
    return record


def load_atp(directory: str | Path, config, schedule) -> dict[int, ATPModule]:
    """The ATP module of every adaptive stage of `schedule`, checked against the model: hidden size, decoder
    depth and image-token count of the record and the weights' shapes; errors name the stage."""
    from safetensors import safe_open

    record = read_record(directory)
    text = config.text_config
    where = Path(directory) / ATP_WEIGHTS
    if int(record["hidden_size"]) != text.hidden_size:
        raise UserError(f"{where}: ATP modules trained for hidden size {record['hidden_size']}, the model has "
                        f"{text.hidden_size}; retrain them for this model (tools/train_atp.py)")
    if int(record.get("num_layers", text.num_hidden_layers)) != text.num_hidden_layers:
        raise UserError(f"{where}: ATP modules trained for {record['num_layers']} decoder layers, the model has "
                        f"{text.num_hidden_layers}")
    trained = {int(s["layer"]) for s in record["stages"]}
    modules = {}
    with safe_open(str(where), framework="pt") as f:
        stored = set(f.keys())
        for i, st in enumerate(schedule.stages):
            if not st.adaptive:
                continue
            if st.layer not in trained:
                raise UserError(f"schedule stage {i} (adaptive, layer {st.layer}): no ATP module was trained for "
                                f"layer {st.layer} (trained: {sorted(trained)}); use those layers or retrain")
            m = ATPModule(text.hidden_size)
            state = {}
            for k, v in m.state_dict().items():
                key = f"layers.{st.layer}.{k}"
                if key not in stored:
                    raise UserError(f"schedule stage {i} (adaptive, layer {st.layer}): {where} lacks {key}")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(v.shape):
                    raise UserError(f"schedule stage {i} (adaptive, layer {st.layer}): {key} has shape "
                                    f"{list(t.shape)}, the model needs {list(v.shape)} (hidden size "
                                    f"{text.hidden_size})")
                state[k] = t.float()
            m.load_state_dict(state)
            modules[st.layer] = m.eval()
    return modules


def adaptive_schedule(directory: str | Path, num_layers: int, num_image_tokens: int, keep: float | None = None,
                      static: bool = False):
    """The `--method adaptive` schedule: the stages of the checkpoint's ATP record (see Schedule.adaptive)."""
    from leanvlm.reduction.schedule import Schedule

    record = read_record(directory)
    if int(record.get("num_image_tokens", num_image_tokens)) != num_image_tokens:
        raise UserError(f"{directory}: ATP modules trained for {record['num_image_tokens']} image tokens, the model "
                        f"has {num_image_tokens}")
    return Schedule.adaptive(num_layers, num_image_tokens, record["stages"], keep, static)


def model_directory(hf_model) -> Path | None:
    """The checkpoint directory a Hugging Face model was loaded from, if it was."""
    path = getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "_name_or_path", "")
    return Path(path) if path and Path(path).is_dir() else None
