"""Make a small, complete LLaVA-1.5-shaped Hugging Face checkpoint (random weights) for tests and the demo."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from leanvlm.errors import UserError

# The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:"), as llava-hf ships it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Text the tokenizer's merges are learned from: enough words for readable prompts and outputs, and the shapes
# task's questions and short-answer instruction (eval.harness.question_prompt) so each of their words is one token.
_CORPUS = """
USER: ASSISTANT: What is in the picture? Describe the image in detail. What colour is the shape?
Is there a red circle, a green square, a blue triangle or a yellow star in this photo?
How many shapes are there? Which shape is left of the other one? The answer is yes. The answer is no.
A cat sits on a mat next to a dog. The sky is blue and the grass is green. One two three four five six.
left right top bottom middle center corner small large big tiny red green blue yellow white black orange
circle square triangle star shape shapes colour color picture image photo scene object objects there is are
What colour is the shape at the top left? Which is further left, the red circle or the blue square?
How many green shapes are there? Is there a triangle? Answer with one word. zero one two three four yes no
"""

TOKENIZER_VOCAB = 512  # BPE merges learned from the corpus; the model's vocab_size may be larger (padded rows)

TINY_DEFAULTS = dict(
    image_size=32,
    patch_size=4,  # (32/4)^2 = 64 image tokens after dropping CLS
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=64,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,  # grouped-query attention
    text_intermediate=128,
    vocab_size=512,
)

# Named configurations. "mid" is the benchmark model of the runtime issue: LLaVA-1.5's image-token count
# (336 px / patch 14 = 576) and vocabulary size on a 512-wide, 8-layer decoder.
PRESETS = {
    "tiny": {},
    "mid": dict(image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=8, text_intermediate=1376,
                vocab_size=32000),
    # the trained shapes-llava (tools/train_shapes.py): 96 px / patch 8 = 144 image tokens, 4x4 per grid cell
    "shapes": dict(image_size=96, patch_size=8, vision_hidden=128, vision_layers=3, vision_heads=4,
                   text_hidden=192, text_layers=4, text_heads=6, text_kv_heads=6, text_intermediate=384),
    # LLaVA-1.5's real shapes (CLIP ViT-L/14-336 with all 24 layers, Vicuna 7B / 13B decoder layers, vocab 32064)
    # with random weights: scale checks without downloading; --layers picks how many decoder layers to build.
    "llava-7b-shape": dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                           text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
                           text_intermediate=11008, vocab_size=32064),
    "llava-13b-shape": dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                            text_hidden=5120, text_layers=40, text_heads=40, text_kv_heads=40,
                            text_intermediate=13824, vocab_size=32064),
}
SAVE_DTYPES = ("float32", "float16", "bfloat16")


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with LLaVA's special tokens, learned deterministically from a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny(out: str | Path, seed: int = 0, preset: str = "tiny", dtype: str = "float32", **overrides) -> Path:
    """Write a loadable LLaVA checkpoint with random weights (config, safetensors, tokenizer, processor) to `out`.

    `preset` picks a named size (see PRESETS); keyword overrides change single fields (text_layers=2 builds a
    two-layer decoder of a real-size preset). `dtype` is how the weights are stored (real checkpoints: float16).
    Written to a temporary sibling directory and moved into place when complete.
    """
    import torch

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"make-tiny: {out} exists and is not empty; choose another directory or remove it")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"make-tiny: --dtype {dtype}: choose one of {', '.join(SAVE_DTYPES)}")
    layers = overrides.get("text_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise UserError(f"make-tiny: --layers {layers}: must be a positive integer")
    model, processor = build_llava(seed, preset, random_spread=True, **overrides)
    return save_checkpoint(model.to(getattr(torch, dtype)), processor, out)


def save_checkpoint(model, processor, out: Path) -> Path:
    """Save model (safetensors) and processor into `out` atomically (temporary sibling, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_llava(seed: int = 0, preset: str = "tiny", random_spread: bool = True, device: str | None = None,
                **overrides):
    """A LlavaForConditionalGeneration and its LlavaProcessor of a named size, in memory.

    random_spread: re-draw weights for distinct random behaviour (test checkpoints); False keeps
    Hugging Face's initialisation (for training and timing). device: where the weights are made (a 7B-shaped
    model initialises in seconds on a GPU, minutes on a CPU).
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    try:  # transformers >= 5.20 names the PIL backend; earlier ones have one CLIPImageProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    unknown = set(overrides) - set(TINY_DEFAULTS)
    if unknown:
        raise UserError(f"make-tiny: unknown option(s) {sorted(unknown)}; known: {sorted(TINY_DEFAULTS)}")
    if preset not in PRESETS:
        raise UserError(f"make-tiny: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = {**TINY_DEFAULTS, **PRESETS[preset], **overrides}
    if p["image_size"] % p["patch_size"]:
        raise UserError(f"make-tiny: image_size {p['image_size']} is not a multiple of patch_size {p['patch_size']}")

    tokenizer = build_tokenizer(TOKENIZER_VOCAB)
    vocab = max(len(tokenizer), p["vocab_size"])
    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden"],
        intermediate_size=p["vision_hidden"] * 4,
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        projection_dim=p["vision_hidden"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=p["text_hidden"],
        intermediate_size=p["text_intermediate"],
        num_hidden_layers=p["text_layers"],
        num_attention_heads=p["text_heads"],
        num_key_value_heads=p["text_kv_heads"],
        vocab_size=vocab,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(p["image_size"] // p["patch_size"]) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration(config).eval()
    if random_spread:
        _spread_weights(model, seed)
        _prefer_printable(model, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    image_processor = ImageProcessor(
        size={"shortest_edge": p["image_size"]},
        crop_size={"height": p["image_size"], "width": p["image_size"]},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )

    return model, processor


def _prefer_printable(model, tokenizer) -> None:
    """Shrink the output rows of tokens that decode to nothing printable (lone bytes, specials but EOS), so
    a random model's greedy text is words rather than replacement characters; logits stay random."""
    import torch

    with torch.no_grad():
        for tid in range(len(tokenizer)):
            text = tokenizer.decode([tid])
            if tid != tokenizer.eos_token_id and (not text.strip() or not text.isprintable() or "\ufffd" in text):
                model.lm_head.weight[tid] *= 0.05
        model.lm_head.weight[len(tokenizer):] *= 0.05  # padded vocabulary rows (no token behind them)


def _spread_weights(model, seed: int) -> None:
    """Re-draw weights with a wider spread than HF's 0.02 init so attention is not uniform.

    With std 0.02 every attention row is nearly flat and top-k selections are decided by ~1e-9
    gaps; a wider spread gives a random model distinct token preferences (and distinct greedy
    outputs), which is what parity tests need to be meaningful.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    residual_out = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            fan_in = param.shape[-1] if param.dim() == 2 else param[0].numel()
            std = 1.0 / fan_in**0.5
            if "embed_tokens" in name:
                std = 1.0
            elif name.endswith(residual_out):  # keep the residual stream from blowing up layer by layer
                std = 0.5 / fan_in**0.5
            param.copy_(torch.randn(param.shape, generator=g) * std)  # drawn on CPU: the same on every machine
