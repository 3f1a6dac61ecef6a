"""Original segment-anything ``.pth`` checkpoints (SAM ViT-B/L/H, MedSAM) as a transformers ``SamModel``.

The official ``segment-anything`` package needs torchvision; instead the state dict is renamed
onto transformers' ``SamModel`` exactly as transformers' own conversion script does
(``transformers/models/sam/convert_sam_to_hf.py``: ``KEYS_TO_MODIFY_MAPPING`` + the hypernetwork
MLP renumbering + the shared positional embedding), and the model's sizes are read from the
tensors' shapes, so ViT-B, -L, -H, MedSAM's ViT-B and smaller variants all load. The file is read
with ``torch.load(weights_only=True)`` (no pickle code runs) and loaded strictly: a missing,
unexpected or misshapen tensor is a :class:`~medseg.errors.CheckpointError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from medseg.errors import CheckpointError

__all__ = ["KEYS_TO_MODIFY_MAPPING", "convert_sam_state_dict", "sam_config_from_state_dict", "load_sam_pth"]

#: original name fragment -> transformers name fragment, applied in this order (from convert_sam_to_hf.py)
KEYS_TO_MODIFY_MAPPING: tuple[tuple[str, str], ...] = (
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"),
    ("blocks", "layers"),
)

_HYPERNETWORK_MLP = re.compile(r".*\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+).*")


def convert_sam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original SAM state dict to transformers ``SamModel`` names (convert_sam_to_hf.replace_keys)."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in KEYS_TO_MODIFY_MAPPING:
            if old in key:
                key = key.replace(old, new)
        match = _HYPERNETWORK_MLP.match(key)
        if match:
            layer = int(match.group(2))
            key = key.replace(
                f"layers.{layer}", {0: "proj_in", 1: "layers.0", 2: "proj_out"}.get(layer, f"layers.{layer}")
            )
        converted[key] = value
    shared = "prompt_encoder.shared_embedding.positional_embedding"
    if shared in converted:
        converted["shared_image_embedding.positional_embedding"] = converted[shared]
    return converted


def sam_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Any:
    """A ``SamConfig`` whose sizes match an original (unconverted) SAM state dict's tensor shapes."""
    from transformers import SamConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise KeyError(key)
        return tuple(state_dict[key].shape)

    hidden, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    use_abs_pos = "image_encoder.pos_embed" in state_dict
    grid = shape("image_encoder.pos_embed")[1] if use_abs_pos else None
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state_dict
    if grid is None:
        raise KeyError("image_encoder.pos_embed")
    window_size, global_blocks, head_dim = 14, [], 64
    if use_rel_pos:
        head_dim = shape("image_encoder.blocks.0.attn.rel_pos_h")[1]
        for index in layers:
            length = shape(f"image_encoder.blocks.{index}.attn.rel_pos_h")[0]
            if length == 2 * grid - 1:
                global_blocks.append(index)
            else:
                window_size = (length + 1) // 2
    output_channels = shape("image_encoder.neck.0.weight")[0]
    decoder_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))
    }
    decoder_hidden = shape("mask_decoder.transformer.layers.0.self_attn.q_proj.weight")[1]
    cross_dim = shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    iou_layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))
    }
    vision = {
        "hidden_size": hidden,
        "output_channels": output_channels,
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(hidden // head_dim, 1),
        "image_size": grid * patch,
        "patch_size": patch,
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        "use_abs_pos": use_abs_pos,
        "use_rel_pos": use_rel_pos,
        "window_size": window_size,
        "global_attn_indexes": global_blocks,
        "num_pos_feats": shape("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")[1],
        "mlp_dim": shape("image_encoder.blocks.0.mlp.lin1.weight")[0],
    }
    prompt = {
        "hidden_size": output_channels,
        "image_size": grid * patch,
        "patch_size": patch,
        "mask_input_channels": shape("prompt_encoder.mask_downscaling.3.weight")[0],
    }
    decoder = {
        "hidden_size": decoder_hidden,
        "mlp_dim": shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        "num_hidden_layers": len(decoder_layers),
        "attention_downsample_rate": max(decoder_hidden // cross_dim, 1),
        "num_multimask_outputs": shape("mask_decoder.mask_tokens.weight")[0] - 1,
        "iou_head_depth": len(iou_layers),
        "iou_head_hidden_dim": shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    }
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _unwrap(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: a plain state dict, or one under ``model``/``state_dict``."""
    if isinstance(content, Mapping):
        for key in ("model", "state_dict"):
            if key in content and isinstance(content[key], Mapping):
                content = content[key]
                break
    if (
        not isinstance(content, Mapping)
        or not content
        or not all(isinstance(v, torch.Tensor) for v in content.values())
    ):
        raise CheckpointError(f"{path}: not a segment-anything state dict (expected a mapping of tensors)")
    return {str(k).removeprefix("module."): v for k, v in content.items()}


def load_sam_pth(path: str | Path) -> Any:
    """Load an original segment-anything / MedSAM ``.pth`` as a transformers ``SamModel`` (eval mode).

    Raises:
        CheckpointError: unreadable file, not a SAM state dict, or tensors that do not fit.
    """
    from transformers import SamModel

    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, unpickling or EOF errors: all mean "not a readable torch file"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first[:200]})") from None
    state_dict = _unwrap(content, path)
    if not any(k.startswith("image_encoder.") for k in state_dict):
        raise CheckpointError(f"{path}: not a segment-anything checkpoint (no image_encoder.* tensors)")
    try:
        config = sam_config_from_state_dict(state_dict)
    except KeyError as missing:
        raise CheckpointError(f"{path}: segment-anything checkpoint lacks tensor {missing.args[0]!r}") from None
    model = SamModel(config)
    try:
        model.load_state_dict(convert_sam_state_dict(state_dict), strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: tensors do not fit a SAM model ({first[:200]})") from None
    return model.eval()
