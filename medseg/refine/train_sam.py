"""``medseg train-sam``: fine-tune SAM's prompt encoder and mask decoder on a fold (the MedSAM recipe).

The image encoder is frozen, so every training slice is embedded once and cached; only the
prompt encoder and the mask decoder learn. Samples are 2D slices along the refinement's slice
axis (:func:`medseg.refine.refine.slice_axis`), windowed exactly as refinement windows them
(:class:`medseg.refine.refine.SliceEncoder`), one per connected component of each structure on
each slice. Each step draws a batch of samples and a fresh jittered prompt for each: the
component's box, every side moved by up to 10 % of the box size inwards or 20 % outwards, and
with probability 1/2 a positive point drawn inside the component. The loss is SAM's: of the
three candidate masks, the one with the lowest Dice + BCE loss is trained (so the three stay
diverse), and the IoU head learns the true IoU of every candidate (mean squared error).

The fold's validation cases are scored every ``validate_every`` steps (mean Dice of the
candidate with the highest predicted IoU, prompted by each component's exact box); the *last*
weights are saved, never the best on validation, because ``medseg refine fit`` then measures the
refinement on those same validation cases.

Output (``--out``): the model in Hugging Face ``save_pretrained`` format (``config.json`` +
``model.safetensors``, loadable by every command that takes ``--sam``), ``train_sam.json`` (the
options, cases, history and timings) and ``history.csv``. ``--sam tiny`` starts from a small
randomly initialised SAM (:func:`tiny_sam_config`) for CPU demos and tests.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medseg.errors import CheckpointError, MedsegUserError
from medseg.io.files import write_json, write_text
from medseg.refine.backends import ImageTransform, SamImageBackend, SliceEmbedding
from medseg.refine.protocol import SlicePrompt
from medseg.refine.refine import SliceEncoder, slice_axis, structure_by_name

__all__ = ["TINY", "TrainSamOptions", "tiny_sam_config", "new_tiny_sam", "train_sam"]

TINY = "tiny"
_MIN_COMPONENT_PIXELS = 4


def tiny_sam_config(*, image_size: int = 64, hidden_size: int = 32) -> Any:
    """A small ``SamConfig``: 2-layer ViT, 32 channels, 64-pixel input, 8 x 8 embedding (~80k parameters)."""
    import transformers

    patch = 8
    vision = transformers.SamVisionConfig(
        hidden_size=hidden_size,
        output_channels=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=hidden_size // 2,
        mlp_dim=hidden_size * 2,
        initializer_range=0.02,  # transformers' default (1e-10) leaves a random encoder blind to the image
    )
    prompt = transformers.SamPromptEncoderConfig(hidden_size=hidden_size, image_size=image_size, patch_size=patch)
    decoder = transformers.SamMaskDecoderConfig(
        hidden_size=hidden_size, mlp_dim=hidden_size * 2, num_attention_heads=2, iou_head_hidden_dim=hidden_size
    )
    return transformers.SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )


def new_tiny_sam(*, seed: int = 0) -> SamImageBackend:
    """A randomly initialised tiny ``SamModel`` (deterministic for a seed) as a prompt backend."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_sam_config()
    model = transformers.SamModel(config).eval()
    transform = ImageTransform(size=int(config.vision_config.image_size), mode="longest_side")
    return SamImageBackend(model, kind="sam", transform=transform, source=TINY)


@dataclass(frozen=True)
class TrainSamOptions:
    """Options of :func:`train_sam` (saved in ``train_sam.json``).

    Attributes:
        steps: optimisation steps at most.
        time_limit_min: stop after this many minutes (embedding included); None: no limit.
        batch_size: prompts per step.
        lr: AdamW learning rate (None: 1e-3 for ``tiny``, 1e-4 otherwise, as MedSAM).
        weight_decay: AdamW weight decay.
        max_train_slices: training slices embedded at most (spread over the cases).
        max_val_slices: validation slices at most.
        validate_every: steps between validations.
        seed: seed of the sampling, the jitter and ``tiny``'s initialisation.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    steps: int = 1000
    time_limit_min: float | None = None
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 0.01
    max_train_slices: int = 1000
    max_val_slices: int = 200
    validate_every: int = 100
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_train_slices", "max_val_slices", "validate_every"):
            if int(getattr(self, name)) < 1:
                raise MedsegUserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            raise MedsegUserError(f"time_limit_min must be > 0, got {self.time_limit_min}")


@dataclass
class _Sample:
    """One training target: a component mask on an embedded slice."""

    embedding: SliceEmbedding
    mask: np.ndarray


def _load_start(sam: str | os.PathLike[str], *, seed: int, device: str) -> SamImageBackend:
    from medseg.refine.loading import load_sam

    if str(sam) == TINY:
        backend = new_tiny_sam(seed=seed)
    else:
        backend = load_sam(sam, device="cpu")
        if not isinstance(backend, SamImageBackend) or backend.kind != "sam":
            raise CheckpointError(f"{sam}: train-sam fine-tunes SAM / MedSAM models (SamModel), not {backend!r}")
    from medseg.model.device import select_device

    backend.device = select_device(device)
    backend.model.to(backend.device)
    return backend


def _collect(
    cases: Sequence[Any],
    manifest: Any,
    backend: SamImageBackend,
    *,
    structures: Sequence[Any],
    max_slices: int,
    rng: np.random.Generator,
    deadline: float | None,
) -> list[_Sample]:
    """Embed up to ``max_slices`` slices holding a structure, spread evenly over the cases."""
    per_case = max(1, int(np.ceil(max_slices / max(len(cases), 1))))
    samples: list[_Sample] = []
    embedded = 0
    for case in cases:
        if embedded >= max_slices or (deadline is not None and time.monotonic() > deadline):
            break
        image, reference = manifest.read_image(case), manifest.read_label(case)
        if image.spatial_ndim != 3:
            raise MedsegUserError(f"{case.case_id}: train-sam needs 3D images, this one is {image.spatial_ndim}D")
        axis = slice_axis(image.spacing_mm)
        encoder = SliceEncoder(image, backend, axis=axis)
        label = reference.array[0]
        masks = [np.isin(label, s.label_ids) for s in structures]
        other = tuple(a for a in range(3) if a != axis)
        indices = sorted({int(i) for m in masks for i in np.nonzero(np.any(m, axis=other))[0]})
        chosen = rng.permutation(indices)[: min(per_case, max_slices - embedded)]
        for index in sorted(int(i) for i in chosen):
            embedding = encoder.embedding(index)
            embedded += 1
            for mask in masks:
                components, count = ndimage.label(np.take(mask, index, axis=axis), structure=np.ones((3, 3), bool))
                for number in range(1, count + 1):
                    component = components == number
                    if component.sum() >= _MIN_COMPONENT_PIXELS:
                        samples.append(_Sample(embedding, component))
    return samples


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())


def _jittered_prompt(mask: np.ndarray, rng: np.random.Generator) -> SlicePrompt:
    """The component's box with every side moved by -10 %..+20 % of the box size, and a point half of the time."""
    r0, c0, r1, c1 = _box(mask)
    size = max(r1 - r0, c1 - c0) + 1
    moves = rng.uniform(-0.1, 0.2, size=4) * size
    height, width = mask.shape
    box = (
        float(np.clip(r0 - moves[0], 0, height - 1)),
        float(np.clip(c0 - moves[1], 0, width - 1)),
        float(np.clip(r1 + moves[2], 0, height - 1)),
        float(np.clip(c1 + moves[3], 0, width - 1)),
    )
    box = (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))
    if rng.random() < 0.5:
        rows, cols = np.nonzero(mask)
        pick = int(rng.integers(len(rows)))
        return SlicePrompt(
            points_rc=np.array([[rows[pick], cols[pick]]], dtype=np.float64),
            point_labels=np.array([1], dtype=np.int64),
            box_rc=box,
        )
    return SlicePrompt(box_rc=box)


def _prompt_inputs(prompt: SlicePrompt, transform: ImageTransform, height: int, width: int, device: Any) -> dict:
    """``input_points`` / ``input_labels`` / ``input_boxes``, scaled as :class:`SamImageBackend` scales them."""
    scale_r, scale_c = transform.scale_rc(height, width)
    inputs: dict[str, torch.Tensor] = {}
    if prompt.points_rc is not None:
        points = np.asarray(prompt.points_rc, dtype=np.float32).reshape(-1, 2)
        xy = np.stack([points[:, 1] * scale_c, points[:, 0] * scale_r], axis=1)
        inputs["input_points"] = torch.from_numpy(xy).view(1, 1, -1, 2).to(device)
        inputs["input_labels"] = torch.as_tensor(prompt.point_labels, dtype=torch.int64).view(1, 1, -1).to(device)
    if prompt.box_rc is not None:
        r0, c0, r1, c1 = prompt.box_rc
        box = [c0 * scale_c, r0 * scale_r, c1 * scale_c, r1 * scale_r]
        inputs["input_boxes"] = torch.tensor([[box]], dtype=torch.float32, device=device)
    return inputs


def _forward(backend: SamImageBackend, sample: _Sample, prompt: SlicePrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) candidate logits on the slice grid and their (3,) predicted IoUs, with gradients."""
    embedding = sample.embedding
    inputs = _prompt_inputs(prompt, backend.transform, embedding.height, embedding.width, backend.device)
    output = backend.model(image_embeddings=embedding.features, multimask_output=True, **inputs)
    logits = backend.transform.logits_to_slice(output.pred_masks[0, 0], embedding.height, embedding.width)
    return logits, output.iou_scores[0, 0]


def _losses(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's loss: min over candidates of soft Dice + BCE, plus the IoU head's squared error."""
    probability = torch.sigmoid(logits)
    flat_p, flat_t = probability.flatten(1), target.flatten()[None].expand(logits.shape[0], -1)
    dice = 1 - (2 * (flat_p * flat_t).sum(1) + 1) / (flat_p.sum(1) + flat_t.sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), flat_t, reduction="none").mean(1)
    mask_loss = (dice + bce).min()
    with torch.no_grad():
        hard = logits.flatten(1) > 0
        inter = (hard & (flat_t > 0.5)).sum(1).float()
        union = (hard | (flat_t > 0.5)).sum(1).float()
        true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    return mask_loss + F.mse_loss(iou_pred, true_iou)


@torch.no_grad()
def _validate(backend: SamImageBackend, samples: Sequence[_Sample]) -> float:
    """Mean Dice of the best-IoU candidate, prompted with each component's exact box."""
    if not samples:
        return float("nan")
    dices = []
    for sample in samples:
        logits, iou = _forward(backend, sample, SlicePrompt(box_rc=_box(sample.mask)))
        mask = (logits[int(torch.argmax(iou))] > 0).cpu().numpy()
        total = mask.sum() + sample.mask.sum()
        dices.append(2 * np.logical_and(mask, sample.mask).sum() / total if total else 1.0)
    return float(np.mean(dices))


def _save_pretrained(model: Any, folder: Path, *, source: str, transform: Any) -> None:
    """``save_pretrained`` (safetensors) into ``folder``, with the input transform it was trained with.

    A source folder's ``preprocessor_config.json`` is copied; otherwise (a ``.pth``, ``tiny``) one is
    written from ``transform``, so the saved folder loads with the pixels it was trained on.
    """
    model.save_pretrained(folder, safe_serialization=True)
    processor = Path(source) / "preprocessor_config.json" if source != TINY else None
    if processor is not None and processor.is_file():
        shutil.copy2(processor, folder / processor.name)
        return
    normalize = tuple(transform.mean) != (0.0, 0.0, 0.0) or tuple(transform.std) != (1.0, 1.0, 1.0)
    settings = {"do_normalize": normalize, "medseg_resize_mode": transform.mode}
    if normalize:
        settings.update(image_mean=list(transform.mean), image_std=list(transform.std))
    write_json(settings, folder / "preprocessor_config.json")


def _publish(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out`` by renames: ``out`` is never half written.

    A previous ``out`` is moved aside first and deleted once the new folder is in place.
    """
    for file in staging.iterdir():  # the data on disk before the names point at it
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    previous = None
    if out.exists():
        previous = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.previous-"))
        os.replace(out, previous / out.name)
    os.replace(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def train_sam(
    sam: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    fold: int = 0,
    out: str | os.PathLike[str],
    structures: Sequence[str] | None = None,
    options: TrainSamOptions = TrainSamOptions(),
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune SAM on a fold's training cases, validate on its validation cases, save in ``out``.

    Args:
        sam: a SAM / MedSAM checkpoint (Hugging Face folder or ``.pth``), or ``"tiny"``.
        manifest: the manifest.
        data_root: its data root.
        fold: the fold (its validation cases are not trained on).
        out: the output folder.
        structures: structures to train on (default: every label and region).
        options: steps, time limit, batch size, learning rate, ...
        progress: progress bar.

    Returns:
        The content of ``train_sam.json`` (history, validation Dice before and after, timings).

    Raises:
        CheckpointError: ``sam`` is not a loadable SAM checkpoint.
        MedsegUserError: no training slices, unknown structure, bad options.
    """
    from tqdm.auto import tqdm

    from medseg.data.manifest import load_manifest

    start = time.monotonic()
    deadline = start + options.time_limit_min * 60 if options.time_limit_min else None
    rng = np.random.default_rng(options.seed)
    loaded = load_manifest(manifest, data_root=data_root)
    try:
        chosen = [structure_by_name(loaded.labels, n) for n in structures] if structures else loaded.labels.structures()
    except ValueError as error:
        raise MedsegUserError(f"--structure: {error}") from None
    train_cases, val_cases = loaded.fold(fold)
    backend = _load_start(sam, seed=options.seed, device=options.device)
    model = backend.model
    for parameter in model.vision_encoder.parameters():
        parameter.requires_grad_(False)
    trainable = [p for name, p in model.named_parameters() if not name.startswith("vision_encoder.")]
    clock = time.monotonic()
    train = _collect(
        train_cases, loaded, backend, structures=chosen, max_slices=options.max_train_slices, rng=rng, deadline=deadline
    )
    val = _collect(
        val_cases, loaded, backend, structures=chosen, max_slices=options.max_val_slices, rng=rng, deadline=None
    )
    embed_s = time.monotonic() - clock
    if not train:
        raise MedsegUserError(f"{manifest}: fold {fold} has no training slices holding {[s.name for s in chosen]}")
    lr = options.lr if options.lr is not None else (1e-3 if str(sam) == TINY else 1e-4)
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=options.weight_decay)
    model.eval()  # no dropout / batch norm in SAM's decoder: eval mode only disables nothing
    history: list[dict[str, Any]] = [
        {"step": 0, "loss": None, "val_dice": _validate(backend, val), "elapsed_s": round(time.monotonic() - start, 2)}
    ]
    losses: list[float] = []
    bar = tqdm(range(1, options.steps + 1), desc="train-sam", unit="step", disable=not progress)
    step = 0
    for step in bar:
        optimiser.zero_grad(set_to_none=True)
        batch = [train[int(i)] for i in rng.integers(0, len(train), size=options.batch_size)]
        loss = torch.stack(
            [
                _losses(
                    *_forward(backend, s, _jittered_prompt(s.mask, rng)),
                    torch.from_numpy(s.mask).float().to(backend.device),
                )
                for s in batch
            ]
        ).mean()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        out_of_time = deadline is not None and time.monotonic() > deadline
        if step % options.validate_every == 0 or step == options.steps or out_of_time:
            history.append(
                {
                    "step": step,
                    "loss": float(np.mean(losses[-options.validate_every :])),
                    "val_dice": _validate(backend, val),
                    "elapsed_s": round(time.monotonic() - start, 2),
                }
            )
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", val_dice=f"{history[-1]['val_dice']:.4f}")
        if out_of_time:
            break
    bar.close()
    record = {
        "format": "medseg-train-sam",
        "start": str(sam),
        "manifest": str(manifest),
        "data_root": str(data_root) if data_root is not None else None,
        "fold": fold,
        "structures": [s.name for s in chosen],
        "options": {**asdict(options), "lr": lr},
        "train_cases": [c.case_id for c in train_cases],
        "val_cases": [c.case_id for c in val_cases],
        "train_samples": len(train),
        "val_samples": len(val),
        "steps_done": step,
        "losses": [round(v, 6) for v in losses],
        "history": history,
        "val_dice_before": history[0]["val_dice"],
        "val_dice_after": history[-1]["val_dice"],
        "embed_s": round(embed_s, 2),
        "elapsed_s": round(time.monotonic() - start, 2),
        "saved": "last weights (never chosen on the validation cases, which refine fit measures on)",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # everything is written into a staging folder beside OUT, which then replaces OUT by renames
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; OUT is an ordinary folder
    try:
        _save_pretrained(model, staging, source=str(sam), transform=backend.transform)
        write_json(record, staging / "train_sam.json")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["step", "loss", "val_dice", "elapsed_s"])
        writer.writeheader()
        writer.writerows(history)
        write_text(buffer.getvalue(), staging / "history.csv")
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already moved unless something failed
    return record
