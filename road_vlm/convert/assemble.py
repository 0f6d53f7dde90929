"""Write one HF ``LlavaForConditionalGeneration`` directory from LLaVA-1.5's parts, the way llava-hf's was made.

What transformers' ``convert_llava_weights_to_hf.py`` does, and so what every llava-hf checkpoint looks like:
``<image>`` (a special, unnormalised added token) and ``<pad>`` are added after the text vocabulary (ids 32000
and 32001 for Vicuna), the embeddings and the LM head are resized to the next multiple of 64 (32064), and
every new row is drawn from a normal distribution with the old embeddings' mean and 1e-5 times their
covariance. The processor is CLIP's image processor plus the tokenizer (patch size, CLS dropped: 576 image
tokens at 336 px). ``prompt_format.json`` records LLaVA-1.5's ``v1`` template and ``pad`` preprocessing.

Weight files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled beyond
tensors. The output appears atomically (written to a temporary sibling, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from road_vlm.data.template import PromptFormat

logger = logging.getLogger(__name__)

PAD_TO_MULTIPLE = 64  # llava-hf pads the vocabulary to a multiple of 64 (32000 + 2 -> 32064)
NEW_ROW_COVARIANCE_SCALE = 1e-5


class ConversionError(ValueError):
    """Parts that cannot be assembled; the message names the file, key or field."""


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, or a PyTorch pickle of tensors loaded with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corruption
        raise ConversionError(f"{path}: not a weights-only PyTorch file ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensors")
    return dict(state)


def read_checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF-style checkpoint directory (sharded or not; safetensors preferred over .bin)."""
    for index_name, pattern in (("model.safetensors.index.json", "model*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = directory / index_name
        if index.is_file():
            files = sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(directory.glob(pattern))
        if files:
            weights: dict[str, torch.Tensor] = {}
            for path in files:
                weights.update(load_tensor_file(path))
            return weights
    raise ConversionError(f"{directory}: no model*.safetensors or pytorch_model*.bin weight files")


def _new_rows(embeddings: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows from N(mean, 1e-5 * covariance) of ``embeddings`` (llava-hf's initialisation)."""
    e = embeddings.float()
    mean = e.mean(dim=0)
    centered = e - mean
    covariance = NEW_ROW_COVARIANCE_SCALE * (centered.T @ centered) / e.shape[0]
    factor, info = torch.linalg.cholesky_ex(covariance)
    if info.item() != 0:  # fewer rows than dimensions (toy models): a tiny ridge keeps it positive definite
        ridge = 1e-6 * covariance.diagonal().mean().clamp(min=1e-12)
        factor = torch.linalg.cholesky(covariance + ridge * torch.eye(e.shape[1]))
    noise = torch.randn(count, e.shape[1], generator=generator)
    return (mean + noise @ factor.T).to(embeddings.dtype)


def add_llava_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add ``<image>`` and ``<pad>`` after the text vocabulary, as llava-hf does; returns their ids."""
    from transformers import AddedToken

    text_vocab = len(tokenizer)
    if "<image>" in tokenizer.get_vocab():
        raise ConversionError("the language model's tokenizer already has an <image> token; expected a plain "
                              "Llama/Vicuna tokenizer")
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<pad>")
    if (image_id, pad_id) != (text_vocab, text_vocab + 1):
        raise ConversionError(f"expected <image> = {text_vocab} and <pad> = {text_vocab + 1}, got {image_id} and "
                              f"{pad_id} (the tokenizer already has a pad token of its own?)")
    return image_id, pad_id


def assemble_llava(
    *,
    text_config: Any,
    vision_config: Any,
    weights: dict[str, torch.Tensor],
    tokenizer: Any,
    image_processor: Any,
    output: str | Path,
    prompt_format: PromptFormat | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    overwrite: bool = False,
    sources: dict[str, str] | None = None,
) -> Path:
    """Build, check and save the HF LLaVA-1.5 model whose weights are ``weights`` (HF LLaVA key names, text
    vocabulary not yet resized). Every expected tensor must be there and nothing else."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass overwrite / --overwrite to replace it)")
    text_vocab = text_config.vocab_size
    if len(tokenizer) != text_vocab:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the language model's vocab_size is "
                              f"{text_vocab}")
    image_id, pad_id = add_llava_tokens(tokenizer)
    patch, size = vision_config.patch_size, vision_config.image_size
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id, pad_token_id=pad_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(size // patch) ** 2,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConversionError(
            "the parts do not make a LLaVA-1.5 model: "
            + (f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else ""))
    reference = model.state_dict()
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise ConversionError(f"{key}: shape {tuple(tensor.shape)}, the configs give {tuple(reference[key].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)

    model.resize_token_embeddings(text_vocab + 2, pad_to_multiple_of=PAD_TO_MULTIPLE, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        old = embed[:text_vocab].clone()
        embed[text_vocab:] = _new_rows(old, embed.shape[0] - text_vocab, generator)
        head[text_vocab:] = _new_rows(old, head.shape[0] - text_vocab, generator)
    model.config.text_config.pad_token_id = pad_id
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", pad_id)):
        setattr(model.generation_config, key, value)

    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (prompt_format or PromptFormat()).save(tmp)
        (tmp / "road_vlm_build.json").write_text(json.dumps(
            {"sources": sources or {}, "text_vocab": text_vocab, "image_token_id": image_id, "pad_token_id": pad_id,
             "vocab_size": int(embed.shape[0]), "dtype": str(dtype).removeprefix("torch."), "seed": seed},
            indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: vocab %d -> %d (<image> %d, <pad> %d), %s", out, text_vocab, embed.shape[0], image_id,
                pad_id, str(dtype).removeprefix("torch."))
    return out
