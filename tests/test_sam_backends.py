"""Segment-Anything backends built from tiny random configs saved to disk and loaded through the real loaders.

No downloads: every model here is a tiny ``SamConfig``/``SamHQConfig``/``Sam2Config``/
``Sam2VideoConfig``/``Sam3Config`` (16-32 wide, 1-2 layers, 64 px input), written with
``save_pretrained`` (or, for the original format, renamed to segment-anything's names and
``torch.save``-d) and read back by :func:`medseg.refine.loading.load_sam`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import oblique_affine  # noqa: E402

from medseg.cli import main  # noqa: E402
from medseg.core.labels import LabelSet  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import CheckpointError  # noqa: E402
from medseg.io.volumes import read_volume, write_volume  # noqa: E402
from medseg.refine.backends import CachedBackend, SamImageBackend  # noqa: E402
from medseg.refine.loading import load_sam, sam_kind  # noqa: E402
from medseg.refine.prompts import PromptError  # noqa: E402
from medseg.refine.protocol import MaskCandidate, PromptBackend, SlicePrompt  # noqa: E402
from medseg.refine.sam_pth import KEYS_TO_MODIFY_MAPPING  # noqa: E402
from medseg.refine.segment import prompt_segment, segment_with_prompts  # noqa: E402
from medseg.refine.video import Sam2VideoBackend  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64  # encoder input of the tiny models (pixels)


# -- tiny models ---------------------------------------------------------------------------------
def tiny_sam_config(kind: str = "sam", *, decoder_heads: int = 2):
    decoder = dict(
        hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=decoder_heads, iou_head_hidden_dim=16
    )
    if kind == "sam_hq":
        decoder["vit_dim"] = 16
    config_class = transformers.SamHQConfig if kind == "sam_hq" else transformers.SamConfig
    return config_class(
        vision_config=dict(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIZE,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=SIZE, patch_size=8, mask_input_channels=4),
        mask_decoder_config=decoder,
    )


def tiny_sam2_config(video: bool = False):
    """SAM2 at 64 px; the video model needs width 128 (transformers fixes its memory width at 64, in 2 pointer tokens)."""
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig

    width = 128 if video else 16
    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        image_size=SIZE,
        patch_stride=4,
        patch_kernel_size=7,
        patch_padding=3,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 2, 2],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[SIZE // 4] * 2, [SIZE // 8] * 2, [SIZE // 16] * 2],
        fpn_hidden_size=width,
    )
    config_class = transformers.Sam2VideoConfig if video else transformers.Sam2Config
    video_sizes = {"memory_encoder_output_channels": 64, "memory_attention_rope_feat_sizes": [SIZE // 16] * 2}
    return config_class(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=width, image_size=SIZE, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=width, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
        ),
        memory_attention_hidden_size=width,
        memory_encoder_hidden_size=width,
        image_size=SIZE,
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32,
        **(video_sizes if video else {}),
    )


def tiny_sam3_config():
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3VisionConfig,
        Sam3ViTConfig,
    )

    backbone = Sam3ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=56,
        patch_size=14,
        window_size=2,
        global_attn_indexes=[0],
    )
    return transformers.Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=16, scale_factors=[2.0, 1.0]),
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=16,
            num_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            mask_fuser_hidden_size=16,
            mask_fuser_num_layers=1,
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=16, num_layers=1, num_queries=4, num_attention_heads=2, intermediate_size=32
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=16, num_upsampling_stages=2),
    )


def save_tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with a handful of words, saved like a real one (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "liver", "tumour", "kidney", "lesion", "spleen"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny SAM, SAM-HQ, SAM2 and SAM2-video folders (random weights, fixed seed)."""
    root = tmp_path_factory.mktemp("sam")
    torch.manual_seed(0)
    folders = {}
    for kind, model in (
        ("sam", transformers.SamModel(tiny_sam_config("sam"))),
        ("sam_hq", transformers.SamHQModel(tiny_sam_config("sam_hq"))),
        ("sam2", transformers.Sam2Model(tiny_sam2_config())),
    ):
        model.save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


def ramp_slice(height: int = 40, width: int = 50) -> np.ndarray:
    grey = (np.add.outer(np.arange(height) * 3, np.arange(width) * 2) % 256).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# -- HF folders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sam", "sam_hq", "sam2"])
def test_hf_folders_load_by_model_type_and_decode_like_the_model_itself(checkpoints, kind) -> None:
    folder = checkpoints[kind]
    assert sam_kind(folder) == kind
    backend = load_sam(folder, device="cpu")
    assert isinstance(backend, SamImageBackend) and isinstance(backend, PromptBackend) and backend.kind == kind
    rgb = ramp_slice()
    prompt = SlicePrompt(points_rc=np.array([[12.0, 30.0]]), point_labels=np.array([1]), box_rc=(5, 8, 30, 44))
    embedding = backend.embed(rgb)
    candidates = backend.decode(embedding, prompt, multimask=True)
    assert len(candidates) == 3 and all(isinstance(c, MaskCandidate) for c in candidates)
    assert [c.predicted_iou for c in candidates] == sorted((c.predicted_iou for c in candidates), reverse=True)
    for candidate in candidates:
        assert candidate.mask.shape == (40, 50) and candidate.mask.dtype == bool
        assert candidate.logits.shape == (40, 50) and candidate.logits.dtype == np.float32
        assert np.array_equal(candidate.mask, candidate.logits > 0)
        assert 0.0 <= candidate.predicted_iou <= 1.0 and 0.0 <= candidate.stability <= 1.0
    assert len(backend.decode(embedding, prompt, multimask=False)) == 1
    # embed-then-decode equals one full forward pass with the same (scaled) prompt
    pixels = backend.transform.pixel_values(rgb)
    scale_r, scale_c = backend.transform.scale_rc(40, 50)
    with torch.no_grad():
        direct = backend.model(
            pixel_values=pixels,
            input_points=torch.tensor([[[[30.0 * scale_c, 12.0 * scale_r]]]]),
            input_labels=torch.tensor([[[1]]]),
            input_boxes=torch.tensor([[[8.0 * scale_c, 5.0 * scale_r, 44.0 * scale_c, 30.0 * scale_r]]]),
            multimask_output=True,
        )
    assert sorted(direct.iou_scores[0, 0].clamp(0, 1).tolist(), reverse=True) == pytest.approx(
        [c.predicted_iou for c in candidates], abs=1e-5
    )


def test_longest_side_transform_keeps_the_aspect_ratio_and_pads() -> None:
    from medseg.refine.backends import ImageTransform

    transform = ImageTransform(size=64, mode="longest_side")
    assert transform.resized_shape(40, 50) == (51, 64)
    pixels = transform.pixel_values(np.full((40, 50, 3), 255, np.uint8))
    assert pixels.shape == (1, 3, 64, 64)
    assert torch.all(pixels[0, :, 51:, :] == 0) and torch.all(pixels[0, 0, :51, :] > 2)  # padding, then white
    square = ImageTransform(size=64, mode="square")
    assert square.resized_shape(40, 50) == (64, 64) and square.scale_rc(40, 50) == (1.6, 1.28)
    logits = torch.zeros(1, 16, 16)
    logits[0, :8, :] = 5.0  # top half positive in the padded square
    back = transform.logits_to_slice(logits, 40, 50)
    assert back.shape == (1, 40, 50) and bool((back[0, :20] > 0).all()) and bool((back[0, 30:] == 0).all())


def test_each_slice_is_embedded_once_per_cache(checkpoints) -> None:
    backend = CachedBackend(load_sam(checkpoints["sam"], device="cpu"))
    a, b = ramp_slice(), ramp_slice()[::-1].copy()
    first = backend.embed(a)
    assert backend.embed(a.copy()) is first and backend.encoder_calls == 1
    backend.embed(b)
    assert backend.encoder_calls == 2
    assert backend.kind == "sam"  # the wrapped backend's attributes show through
    assert CachedBackend(backend.backend).encoder_calls == 0  # a new cache starts empty


def test_normalisation_comes_from_the_folders_preprocessor_config(tmp_path, checkpoints) -> None:
    import shutil

    folder = tmp_path / "medsam_port"
    shutil.copytree(checkpoints["sam"], folder)
    assert load_sam(folder, device="cpu").transform.mean == (0.485, 0.456, 0.406)  # SamImageProcessor's default
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    transform = load_sam(folder, device="cpu").transform
    assert transform.mean == (0.5, 0.5, 0.5) and transform.std == (0.25, 0.25, 0.25)
    pixels = transform.pixel_values(np.full((8, 8, 3), 255, np.uint8))
    assert float(pixels[0, 0, 0, 0]) == pytest.approx(2.0)  # (1 - 0.5) / 0.25


# -- original .pth -------------------------------------------------------------------------------
def to_segment_anything_names(hf_state: dict) -> dict:
    """Invert convert_sam_to_hf's renaming: a transformers SamModel state dict with segment-anything's key names."""
    state = {}
    for key, value in hf_state.items():
        if key == "shared_image_embedding.positional_embedding":
            continue
        match = re.match(r"(.*\.output_hypernetworks_mlps\.\d+\.)(proj_in|layers\.0|proj_out)(\..*)", key)
        if match:
            key = (
                match.group(1)
                + {"proj_in": "layers.0", "layers.0": "layers.1", "proj_out": "layers.2"}[match.group(2)]
                + match.group(3)
            )
        else:
            for old, new in reversed(KEYS_TO_MODIFY_MAPPING):
                if old == "blocks":
                    key = key.replace("vision_encoder.layers", "vision_encoder.blocks")
                elif old == ".norm":  # not the neck's / mask_embed's norms, renamed by their own rules
                    key = re.sub(r"(?<!neck)(?<!mask_embed)\.layer_norm", ".norm", key)
                elif new in key:
                    key = key.replace(new, old)
        state[key] = value.clone()
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return state


def test_original_pth_checkpoint_maps_onto_sam_model(tmp_path) -> None:
    torch.manual_seed(3)
    reference = transformers.SamModel(tiny_sam_config("sam", decoder_heads=8)).eval()  # 8: segment-anything's decoder
    original = to_segment_anything_names(reference.state_dict())
    # the renamed dict looks like segment-anything's (names from segment_anything/modeling)
    for name in (
        "image_encoder.pos_embed",
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.blocks.0.norm1.weight",
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.blocks.1.attn.rel_pos_h",
        "image_encoder.blocks.0.mlp.lin1.weight",
        "image_encoder.neck.0.weight",
        "image_encoder.neck.1.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.point_embeddings.0.weight",
        "prompt_encoder.mask_downscaling.0.weight",
        "prompt_encoder.no_mask_embed.weight",
        "mask_decoder.iou_token.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.output_upscaling.0.weight",
        "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
        "mask_decoder.iou_prediction_head.layers.0.weight",
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.transformer.layers.0.norm1.weight",
        "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight",
        "mask_decoder.transformer.norm_final_attn.weight",
    ):
        assert name in original, name
    assert not any("vision_encoder" in k or "layer_norm" in k or "proj_in" in k for k in original)
    path = tmp_path / "medsam_tiny.pth"
    torch.save(original, path)
    assert sam_kind(path) == "sam_pth"
    backend = load_sam(path, device="cpu")
    loaded = backend.model.state_dict()
    expected = reference.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    config = backend.model.config
    assert config.vision_config.global_attn_indexes == [1] and config.vision_config.window_size == 4
    assert config.mask_decoder_config.num_attention_heads == 8 and config.vision_config.image_size == SIZE
    # same answers as the model it came from
    direct = SamImageBackend(reference, kind="sam", transform=backend.transform)
    prompt = SlicePrompt(box_rc=(4, 6, 30, 40))
    for ours, theirs in zip(
        backend.decode(backend.embed(ramp_slice()), prompt), direct.decode(direct.embed(ramp_slice()), prompt)
    ):
        assert np.allclose(ours.logits, theirs.logits, atol=1e-5)
    # wrapped under "model" as some training scripts save it
    torch.save({"model": original, "epoch": 3}, tmp_path / "wrapped.pth")
    assert isinstance(load_sam(tmp_path / "wrapped.pth", device="cpu"), SamImageBackend)


@pytest.mark.parametrize(
    "vision",
    [
        {},  # ViT-B (SAM's sam_vit_b and MedSAM's medsam_vit_b)
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "global_attn_indexes": [5, 11, 17, 23],
        },
        {
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "global_attn_indexes": [7, 15, 23, 31],
        },
    ],
    ids=["vit_b", "vit_l", "vit_h"],
)
def test_full_size_sam_configs_are_read_back_from_tensor_shapes(vision) -> None:
    """The sizes convert_sam_to_hf.get_config hard-codes per model name come back from the shapes alone."""
    from medseg.refine.sam_pth import sam_config_from_state_dict

    with torch.device("meta"):  # shapes only: no memory, no time
        model = transformers.SamModel(transformers.SamConfig(vision_config=vision))
    config = sam_config_from_state_dict(to_segment_anything_names(model.state_dict()))
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "global_attn_indexes",
        "image_size",
        "patch_size",
        "window_size",
        "output_channels",
        "mlp_dim",
    ):
        ours, theirs = getattr(config.vision_config, key), getattr(model.config.vision_config, key)
        assert (list(ours) if key == "global_attn_indexes" else ours) == (
            list(theirs) if key == "global_attn_indexes" else theirs
        ), key
    for key in (
        "hidden_size",
        "mlp_dim",
        "num_hidden_layers",
        "iou_head_depth",
        "iou_head_hidden_dim",
        "num_multimask_outputs",
        "attention_downsample_rate",
    ):
        assert getattr(config.mask_decoder_config, key) == getattr(model.config.mask_decoder_config, key), key
    assert config.prompt_encoder_config.mask_input_channels == model.config.prompt_encoder_config.mask_input_channels


# -- bad checkpoints -----------------------------------------------------------------------------
def test_missing_corrupt_and_wrong_checkpoints_are_one_line_errors(tmp_path, checkpoints) -> None:
    import shutil

    cases = {}
    cases["missing"] = (tmp_path / "nope", "not found")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases["wrong type"] = (other, "model_type 'bert' is not a Segment-Anything model")
    no_config = tmp_path / "empty"
    no_config.mkdir()
    cases["no config"] = (no_config, "no config.json")
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoints["sam"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    cases["truncated"] = (truncated, "cannot load sam weights")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(checkpoints["sam"], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 24
    (mismatched / "config.json").write_text(json.dumps(config))
    cases["mismatched"] = (mismatched, "sam")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    cases["garbage pth"] = (garbage, "not a readable torch checkpoint")
    unrelated = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, unrelated)
    cases["other pth"] = (unrelated, "not a segment-anything checkpoint")
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    cases["other file"] = (text, "not a SAM checkpoint")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError) as raised:
            load_sam(path, device="cpu")
        assert message in str(raised.value), name
        assert str(path) in str(raised.value) and "\n" not in str(raised.value), name


# -- SAM2 video propagation -----------------------------------------------------------------------
class _Output:
    def __init__(self, pred_masks, object_score_logits):
        self.pred_masks, self.object_score_logits = pred_masks, object_score_logits


class DiskVideoModel(torch.nn.Module):
    """Stands in for Sam2VideoModel: the object is present on ``present`` slices, as a disk."""

    def __init__(self, present: set[int]) -> None:
        super().__init__()
        self.present = present
        self.calls: list[tuple[int, bool]] = []

    def forward(self, inference_session, frame_idx, reverse=False):
        self.calls.append((frame_idx, reverse))
        session_frame = inference_session.processed_frames[frame_idx]  # frames are made lazily
        assert session_frame.shape == (3, SIZE, SIZE)
        yy, xx = np.mgrid[:16, :16]
        disk = ((yy - 8) ** 2 + (xx - 8) ** 2 < 16).astype(np.float32) * 20 - 10
        here = frame_idx in self.present
        masks = torch.from_numpy(disk if here else np.full((16, 16), -10, np.float32))[None, None]
        return _Output(masks, torch.tensor([[5.0 if here else -5.0]]))


def test_propagation_goes_both_ways_and_stops_where_the_object_ends() -> None:
    from medseg.refine.backends import ImageTransform

    model = DiskVideoModel(present={2, 3, 4, 5, 8})  # 8 is another object past a gap
    backend = Sam2VideoBackend(model, transform=ImageTransform(size=SIZE, mode="square"))
    frames = np.stack([ramp_slice(32, 32)] * 10)
    masks = backend.propagate(
        lambda i: frames[i], num_slices=10, key_index=3, prompt=SlicePrompt(box_rc=(10, 10, 20, 20))
    )
    assert sorted(masks) == [2, 3, 4, 5]
    assert all(m.shape == (32, 32) and m.any() for m in masks.values())
    assert (6, False) in model.calls and (1, True) in model.calls and not any(i in (0, 7, 8, 9) for i, _ in model.calls)
    # an object absent on the key slice segments nothing
    assert (
        backend.propagate(lambda i: frames[i], num_slices=10, key_index=0, prompt=SlicePrompt(box_rc=(1, 1, 5, 5)))
        == {}
    )


@pytest.fixture(scope="module")
def video_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny SAM2-video folders whose object-score head says 'present' (+) or 'absent' (-) everywhere."""
    root = tmp_path_factory.mktemp("sam2video")
    folders = {}
    for sign, name in ((1.0, "present"), (-1.0, "absent")):
        torch.manual_seed(1)
        model = transformers.Sam2VideoModel(tiny_sam2_config(video=True))
        head = model.mask_decoder.pred_obj_score_head.proj_out
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(8.0 * sign)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_real_sam2_video_model_propagates_through_slices(video_checkpoints) -> None:
    backend = load_sam(video_checkpoints["present"], device="cpu")
    assert isinstance(backend, Sam2VideoBackend)
    frames = np.stack([np.roll(ramp_slice(36, 36), shift, axis=1) for shift in range(5)])
    prompt = SlicePrompt(points_rc=np.array([[18.0, 18.0]]), point_labels=np.array([1]), box_rc=(8, 8, 28, 28))
    masks = backend.propagate(lambda i: frames[i], num_slices=5, key_index=2, prompt=prompt, presence_threshold=0.5)
    assert sorted(masks) == [0, 1, 2, 3, 4]  # from the key slice both ways: the object never ends here
    assert all(m.shape == (36, 36) and m.any() for m in masks.values())
    (candidate,) = backend.decode(backend.embed(frames[0]), prompt)
    assert candidate.predicted_iou > 0.99 and candidate.mask.shape == (36, 36)
    absent = load_sam(video_checkpoints["absent"], device="cpu")
    assert absent.propagate(lambda i: frames[i], num_slices=5, key_index=2, prompt=prompt) == {}


def test_segment_command_propagates_and_keeps_box_objects_in_their_slices(video_checkpoints, tmp_path, capsys) -> None:
    image = Volume(np.random.default_rng(2).normal(size=(1, 30, 30, 6)).astype(np.float32), oblique_affine())
    source = write_volume(image, tmp_path / "case.nii.gz")
    common = ["segment", str(source), "--sam", str(video_checkpoints["present"]), "--device", "cpu", "--propagate"]
    assert main([*common, "--output", str(tmp_path / "points.nii.gz"), "--point", "15,15,2"]) == 0
    points = read_volume(tmp_path / "points.nii.gz", kind="label")
    assert points.same_geometry(read_volume(source), tolerance_mm=1e-5)
    assert sorted(set(np.nonzero(points.array[0])[2])) == [0, 1, 2, 3, 4, 5]  # propagated through the volume
    assert main([*common, "--output", str(tmp_path / "box.nii.gz"), "--box", "5,5,2,25,25,3"]) == 0
    boxed = read_volume(tmp_path / "box.nii.gz", kind="label").array[0] > 0
    assert sorted(set(np.nonzero(boxed)[2])) == [2, 3]  # a 3D box bounds the object's slices
    absent = ["segment", str(source), "--sam", str(video_checkpoints["absent"]), "--device", "cpu", "--propagate"]
    assert main([*absent, "--output", str(tmp_path / "none.nii.gz"), "--point", "15,15,2"]) == 0
    assert not read_volume(tmp_path / "none.nii.gz", kind="label").array.any()
    assert "segmented 0 voxels on 0 slices" in capsys.readouterr().out


# -- SAM3 text -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam3_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sam3") / "sam3"
    torch.manual_seed(2)
    transformers.Sam3Model(tiny_sam3_config()).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def test_sam3_text_prompt_segments_a_volume(sam3_checkpoint, tmp_path) -> None:
    backend = load_sam(sam3_checkpoint, device="cpu")
    assert backend.kind == "sam3"
    embedding = backend.embed(ramp_slice(30, 30))
    everything = backend.decode_text(embedding, "liver", threshold=0.0)
    assert len(everything) == 4  # one per query of the tiny model
    assert [c.predicted_iou for c in everything] == sorted((c.predicted_iou for c in everything), reverse=True)
    assert backend.decode_text(embedding, "liver", threshold=1.01) == []
    with pytest.raises(PromptError, match="takes --text prompts"):
        backend.decode(embedding, SlicePrompt(box_rc=(1, 1, 5, 5)))
    volume = Volume(np.random.default_rng(0).normal(size=(1, 30, 30, 3)).astype(np.float32), oblique_affine())
    result = segment_with_prompts(volume, backend, text="liver", text_threshold=0.0)
    assert result.labels.same_geometry(volume) and result.slices_prompted == (0, 1, 2) and result.encoder_calls == 3
    expected = np.stack(
        [
            np.any(
                [c.mask for c in backend.decode_text(backend.embed(_rgb(volume, k)), "liver", threshold=0.0)], axis=0
            )
            for k in range(3)
        ],
        axis=-1,
    )
    assert np.array_equal(result.labels.array[0] > 0, expected)
    missing_tokenizer = tmp_path / "no_tokenizer"
    transformers.Sam3Model(tiny_sam3_config()).save_pretrained(missing_tokenizer)
    with pytest.raises(CheckpointError, match="no usable tokenizer"):
        load_sam(missing_tokenizer, device="cpu")


def _rgb(volume: Volume, k: int) -> np.ndarray:
    from medseg.refine.windowing import intensity_window, slice_to_rgb

    low, high = intensity_window(volume.array[0])
    return slice_to_rgb(volume.array[0, :, :, k], low, high)


# -- volumes, CLI, geometry -----------------------------------------------------------------------
class BoxBackend:
    """A controlled backend: the mask is exactly the prompt's box (or a 3x3 square around the first point)."""

    kind = "sam"
    name = "box"

    def embed(self, slice_rgb):
        return slice_rgb.shape[:2]

    def decode(self, embedding, prompt, *, multimask=True):
        mask = np.zeros(embedding, bool)
        if prompt.box_rc is not None:
            r0, c0, r1, c1 = prompt.box_rc
            mask[r0 : r1 + 1, c0 : c1 + 1] = True
        else:
            r, c = (int(v) for v in prompt.points_rc[0])
            mask[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = True
        return [MaskCandidate(mask=mask, predicted_iou=1.0, stability=1.0, logits=mask.astype(np.float32))]


def test_boxes_and_world_points_on_an_oblique_volume_land_where_given() -> None:
    affine = oblique_affine()
    volume = Volume(np.zeros((1, 20, 24, 9), np.float32), affine)
    labels = prompt_segment(volume, BoxBackend(), boxes=[(3, 4, 2, 8, 10, 5)])
    expected = np.zeros((20, 24, 9), bool)
    expected[3:9, 4:11, 2:6] = True
    assert np.array_equal(labels.array[0] > 0, expected) and labels.kind == "label"
    assert np.array_equal(labels.affine, affine)
    voxel = np.array([7, 11, 4])
    world = (affine @ np.append(voxel, 1.0))[:3]
    pointed = prompt_segment(volume, BoxBackend(), points=[tuple(world)], world=True).array[0]
    assert np.argwhere(pointed).mean(axis=0).tolist() == [7.0, 11.0, 4.0]  # a 3x3 square around (7, 11) on slice 4
    assert set(np.nonzero(pointed)[2]) == {4}
    with pytest.raises(PromptError, match="outside the image"):
        prompt_segment(volume, BoxBackend(), points=[(7, 11, 9)])
    with pytest.raises(PromptError, match="no prompt"):
        prompt_segment(volume, BoxBackend())


def test_2d_images_take_two_coordinates() -> None:
    image = Volume(np.zeros((1, 20, 24), np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    labels = prompt_segment(image, BoxBackend(), boxes=[(2, 3, 6, 9)])
    assert labels.spatial_shape == (20, 24) and np.array_equal(labels.affine, image.affine)
    assert np.argwhere(labels.array[0]).min(axis=0).tolist() == [2, 3]
    assert np.argwhere(labels.array[0]).max(axis=0).tolist() == [6, 9]
    pointed = prompt_segment(image, BoxBackend(), points=[(10, 12)]).array[0]
    assert np.argwhere(pointed).mean(axis=0).tolist() == [10.0, 12.0]


class MaskSegmenter:
    """Stands in for a trained U-Net: predicts a fixed label map."""

    def __init__(self, label_map: np.ndarray, labels: LabelSet) -> None:
        self.label_map, self.labels = label_map, labels

    def predict(self, volume):
        return volume.with_array(self.label_map[None], kind="label")


def test_text_with_a_unet_prompts_from_its_mask_of_that_structure() -> None:
    label_map = np.zeros((20, 20, 6), np.uint8)
    label_map[4:8, 4:9, 1:3] = 1  # Anterior
    label_map[12:16, 12:15, 4] = 2  # Posterior
    unet = MaskSegmenter(label_map, LabelSet.from_manifest({"0": "background", "1": "Anterior", "2": "Posterior"}))
    volume = Volume(np.zeros((1, 20, 20, 6), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    result = segment_with_prompts(volume, BoxBackend(), text="Hippocampus head", model=unet, margin_mm=1.0)
    expected = np.zeros((20, 20, 6), bool)
    expected[3:9, 3:10, 1:3] = True  # the U-Net's component, widened by 1 mm, on its two slices only
    assert np.array_equal(result.labels.array[0] > 0, expected) and result.slices_prompted == (1, 2)
    with pytest.raises(PromptError, match="unknown structure name 'amygdala'"):
        segment_with_prompts(volume, BoxBackend(), text="amygdala", model=unet)
    empty = MaskSegmenter(np.zeros_like(label_map), unet.labels)
    nothing = segment_with_prompts(volume, BoxBackend(), text="posterior", model=empty)
    assert not nothing.labels.array.any() and "found no 'Posterior'" in nothing.notes[0]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_segment_command_writes_labels_in_the_input_geometry(tmp_path, checkpoints, capsys, suffix) -> None:
    image = Volume(np.random.default_rng(0).normal(size=(1, 24, 20, 6)).astype(np.float32), oblique_affine())
    source = write_volume(image, tmp_path / f"case{suffix}")
    code = main(
        [
            "segment",
            str(source),
            "--sam",
            str(checkpoints["sam"]),
            "--output",
            str(tmp_path / "out"),
            "--box",
            "2,3,1,20,15,3",
            "--point",
            "10,10,2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    written = tmp_path / "out" / source.name
    labels = read_volume(written, kind="label")
    original = read_volume(source)
    assert labels.spatial_shape == original.spatial_shape and labels.same_geometry(original, tolerance_mm=1e-5)
    assert np.allclose(labels.affine, original.affine, atol=1e-5)
    inside = np.zeros(original.spatial_shape, bool)
    inside[2:21, 3:16, 1:4] = True
    assert not (labels.array[0] > 0)[~inside].any()  # nothing outside the box's slices and rectangle
    assert "3 slices" in capsys.readouterr().out


def test_segment_command_errors_are_one_line(tmp_path, checkpoints, capsys) -> None:
    image = Volume(np.zeros((1, 10, 10, 4), np.float32), np.eye(4))
    source = write_volume(image, tmp_path / "case.nii.gz")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 truncated")
    runs = [
        (["--sam", str(broken), "--point", "1,1,1"], "broken.pth: not a readable torch checkpoint"),
        (["--sam", str(checkpoints["sam"]), "--point", "1,1,7"], "lies outside the image"),
        (["--sam", str(checkpoints["sam"]), "--point", "1,x,1"], "expected comma-separated numbers"),
        (["--sam", str(checkpoints["sam"]), "--text", "liver"], "text prompts need a SAM3 checkpoint"),
        (["--sam", str(checkpoints["sam"]), "--box", "1,1,1,5,5,2", "--propagate"], "needs a SAM2 video checkpoint"),
    ]
    for options, message in runs:
        code = main(["segment", str(source), "--output", str(tmp_path / "o.nii.gz"), "--device", "cpu", *options])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("medseg: error:") and message in err and "\n" not in err, (options, err)
    assert not (tmp_path / "o.nii.gz").exists()


def test_segment_command_text_with_a_trained_run_uses_its_label_map_and_synonyms(tmp_path, checkpoints, capsys) -> None:
    from test_inference import write_checkpoint

    run = tmp_path / "run"
    write_checkpoint(run, labels={"0": "background", "1": "Anterior", "2": "Posterior"})
    (run / "resolved_config.json").write_text(json.dumps({"manifest": {"synonyms": {"Posterior": ["uncal tail"]}}}))
    image = Volume(np.random.default_rng(1).normal(size=(1, 14, 12, 6)).astype(np.float32) + 2, oblique_affine())
    source = write_volume(image, tmp_path / "case.nii.gz")
    out = tmp_path / "seg.nii.gz"
    code = main(
        [
            "segment",
            str(source),
            "--sam",
            str(checkpoints["sam2"]),
            "--output",
            str(out),
            "--text",
            "Uncal_Tail",
            "--model",
            str(run),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert read_volume(out, kind="label").same_geometry(read_volume(source), tolerance_mm=1e-5)
    code = main(
        [
            "segment",
            str(source),
            "--sam",
            str(checkpoints["sam2"]),
            "--output",
            str(out),
            "--text",
            "spleen",
            "--model",
            str(run),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown structure name 'spleen'; the model's label map has: Anterior, Posterior" in err


def test_medsam_pth_gets_medsams_input_transform():
    """MedSAM's inference script: 1024 x 1024 square resize, [0, 1] pixels, no ImageNet mean/std."""
    from medseg.refine.loading import pth_transform

    medsam = pth_transform(Path("/models/MedSAM_vit_b.pth"), size=1024)
    assert medsam.mode == "square" and medsam.mean == (0.0, 0.0, 0.0) and medsam.std == (1.0, 1.0, 1.0)
    pixels = medsam.pixel_values(np.full((10, 20, 3), 255, np.uint8))
    assert pixels.shape == (1, 3, 1024, 1024) and torch.allclose(pixels, torch.ones_like(pixels))
    sam = pth_transform(Path("/models/sam_vit_b_01ec64.pth"), size=1024)
    assert sam.mode == "longest_side" and sam.mean != (0.0, 0.0, 0.0)
