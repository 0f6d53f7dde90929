"""A tiny LLaVA-1.5-architecture model, built from a config and saved in Hugging Face format.

Tests and the demo cannot download checkpoints, so they build a real ``LlavaForConditionalGeneration``
(CLIP vision tower + 2-layer MLP projector + Llama language model) at toy sizes, with a real BPE tokenizer
trained on the given corpus and a real ``LlavaProcessor``. Everything downstream loads it through
``road_vlm.model.load_vlm`` exactly as it would load ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from road_vlm.data.template import SYSTEM_V1

IMAGE_SIZE = 32
PATCH_SIZE = 8
# LLaVA-1.5's CLIP mean/std; expand2square pads with mean*255 = (122, 116, 104).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_BASE_CORPUS = [
    SYSTEM_V1,
    "USER: ASSISTANT: Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Reference OCR token: Context: Question: Options: (A) (B) (C) (D) (E) N/A",
    "yes no Yes No A B C D E 0 1 2 3 4 5 6 7 8 9 10",
    "What is in the image? Describe the image briefly. There is a the an of and in on",
]


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """A Llama-style tokenizer: BPE over '▁'-marked words with byte fallback, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False, min_frequency=1
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    # BpeTrainer cannot add byte-fallback pieces as ordinary tokens, so rebuild the model with them
    # placed right after the special tokens (the Llama layout: <unk> <s> </s> <0x00>..<0xFF> ...).
    trained = json.loads(tok.to_str())["model"]
    ordered = special + byte_tokens + [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])
                                       if t not in special and t not in byte_tokens]
    vocab = {t: i for i, t in enumerate(ordered)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    tok.add_special_tokens(special)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def build_tiny_llava(
    output_dir: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    vocab_size: int = 640,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_layers: int = 2,
    image_size: int = IMAGE_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write a tiny LLaVA-1.5 checkpoint (weights, tokenizer, processor) to ``output_dir``.

    The layout matches llava-hf/llava-1.5-7b-hf: ``<image>`` and ``<pad>`` are added tokens after the text
    vocabulary, the vision feature layer is -2 with the CLS token dropped (16 image tokens for a 32x32 image
    with 8x8 patches). If ``output_dir`` already holds a complete checkpoint it is reused unless ``overwrite``.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(output_dir)
    marker = out / "config.json"
    if marker.exists() and (out / "model.safetensors").exists() and not overwrite:
        return out
    tmp = _fresh_tmp(out)
    tmp.mkdir(parents=True)

    texts = list(_BASE_CORPUS) + list(corpus or [])
    backend = _train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=2048,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=PATCH_SIZE, projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(image_size // PATCH_SIZE) ** 2, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    _publish(tmp, out)
    return out


def pretrain_tiny_llava(
    init_dir: str | Path,
    text_data: str | Path,
    caption_data: str | Path,
    output_dir: str | Path,
    *,
    text_steps: int = 2500,
    caption_steps: int = 1500,
    batch_size: int = 16,
    text_learning_rate: float = 5e-4,
    caption_learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Give a freshly built tiny base the abilities a real LLaVA-1.5 base brings, in the order it acquires them.

    1. the language model (embeddings, decoder, lm_head) on text-only conversations — Vicuna's stand-in;
    2. vision tower + projector on captions with the language model frozen — LLaVA's stage-1 alignment, which
       makes image tokens readable by the language model's own text circuits.

    ``text_steps`` and ``caption_steps`` optimizer steps. The text phase's lower learning rate is what makes the
    yes/no questions learnable reliably: at 1e-3, whether "Is there a circle?" (about a scene in words) was learned
    at all depended on the batch order. A real LLaVA-1.5 checkpoint never goes through this; the RoAd stage
    afterwards uses the real DeepSpeed recipe. Single process on purpose (a one-off); data go through the same
    dataset and collator as training.
    """
    import random

    from road_vlm.data.collator import SupervisedCollator
    from road_vlm.data.config import DataConfig
    from road_vlm.data.dataset import LazySupervisedDataset
    from road_vlm.data.indexing import Tokenization
    from road_vlm.model import load_base, num_image_tokens

    torch.manual_seed(seed)
    model, processor = load_base(init_dir, dtype=torch.float32)
    tokenization = Tokenization(processor.tokenizer, num_image_tokens(processor), model.config.image_token_index)
    collate = SupervisedCollator(pad_token_id=processor.tokenizer.pad_token_id)
    rng = random.Random(seed)
    is_vision = {name: ("vision_tower" in name or "multi_modal_projector" in name)
                 for name, _ in model.named_parameters()}
    phases = (("language model on text", text_data, False, text_steps, text_learning_rate),
              ("vision + projector on captions", caption_data, True, caption_steps, caption_learning_rate))
    model.train()
    for desc, data, vision, steps, learning_rate in phases:
        # Tokenised and decoded once: a few thousand tiny samples, each drawn many times.
        lazy = LazySupervisedDataset(DataConfig(path=str(data), max_length=512), tokenization,
                                     processor.image_processor)
        dataset = [lazy[i] for i in range(len(lazy))]
        for name, param in model.named_parameters():
            param.requires_grad_(is_vision[name] == vision)
        _fit(model, dataset, collate, steps=steps, batch_size=batch_size, learning_rate=learning_rate, rng=rng,
             desc=f"tiny base: {desc}", progress=progress)
    model.requires_grad_(True)
    model.eval()

    out = Path(output_dir)
    tmp = _fresh_tmp(out)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(tmp)
    _publish(tmp, out)
    return out


def _fresh_tmp(out: Path) -> Path:
    """An empty sibling of ``out`` to write into before publishing (left over by a killed run: removed)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` so a half-written model is never mistaken for a complete (cached) one."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _fit(model, dataset, collate, *, steps: int, batch_size: int, learning_rate: float, rng, desc: str,
         progress: bool) -> None:
    """AdamW with warmup + cosine over the parameters that require grad; random batches from ``dataset`` (a list
    of samples)."""
    import math

    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 30)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", mininterval=2.0)
    for _ in bar:
        batch = collate([dataset[i] for i in rng.sample(range(len(dataset)), min(batch_size, len(dataset)))])
        loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
            pixel_values=batch["pixel_values"],
        ).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
