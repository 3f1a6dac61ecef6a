"""Mask R-CNN (He et al., ICCV 2017) for 2D instances: builder, targets from instance maps and back.

``medseg plan --architecture maskrcnn`` plans it (2D configurations only) and the pipeline trains,
validates, predicts (slice by slice on a volume, with mirroring TTA and fold ensembles) and
exports it like every other network, through :class:`MaskRCNNSegmenter`:

* **training**: ``forward(images, labels)`` returns the detector's summed losses (RPN objectness
  and boxes, box classification and regression, masks); the instances are the connected
  components of each foreground class in the label patch (:func:`patch_targets`), each with
  that class;
* **inference**: ``forward(images)`` returns dense per-class log-scores at input size, so the
  sliding-window engine, TTA and ensembles need nothing special: the score of class ``c`` at a
  pixel is the largest ``detection score x mask probability`` of the class-``c`` detections
  covering it, background is 1 minus the largest foreground score, and the log is taken after
  a floor of 1e-6.

Its own instances (windows merged, slices linked, one score per instance), the panoptic map and
the per-instance score table that ``medseg predict`` writes come from
:mod:`medseg.inference.detections`, which runs the detector directly.

* :func:`build_maskrcnn`: torchvision's ``MaskRCNN`` on a ResNet-FPN built with ``weights=None``
  (nothing downloads), **trainable** batch norm (torchvision's default ``FrozenBatchNorm2d`` would
  freeze random statistics), every backbone stage trainable, ``min_size`` / ``max_size`` set to
  the patch so images are never resized, the first convolution built for ``in_channels``
  (one-channel MRI included) with mean 0 / sd 1 normalisation (medseg's images are already
  z-scored), and anchors sized for lesions (8-128 pixels by default, not COCO's 32-512).
* :func:`instance_targets`: an instance map -> ``boxes`` (x0, y0, x1, y1; a one-pixel object
  has a 1 x 1 box), ``labels`` and ``masks``; an empty slice gives empty tensors, which
  torchvision accepts as an image without objects.
* :func:`instances_from_detections`: detections -> an instance map (ids 1..N by descending
  score; a pixel claimed by several masks goes to the highest score) and the scores of the
  instances kept, the per-instance score table AP50/AP75 need.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medseg.errors import MedsegUserError

__all__ = [
    "MaskRCNNSegmenter",
    "build_maskrcnn",
    "build_maskrcnn_segmenter",
    "instance_targets",
    "instances_from_detections",
    "patch_targets",
]


def build_maskrcnn(
    *,
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    backbone: str = "resnet18",
    anchor_sizes: Sequence[int] = (8, 16, 32, 64, 128),
    detections_per_image: int = 100,
    proposals_per_image: int = 500,
    rois_per_image: int = 128,
) -> nn.Module:
    """A randomly initialised 2D Mask R-CNN (see the module docstring).

    Args:
        in_channels: image channels.
        num_classes: classes, background included (a single thing structure: 2).
        patch_size: the 2D patch (rows, columns); images are never resized.
        backbone: ``resnet18``, ``resnet34`` or ``resnet50`` (with an FPN).
        anchor_sizes: anchor side per FPN level (pixels).
        detections_per_image: most detections kept per image.
        proposals_per_image: region proposals kept after non-maximum suppression (torchvision:
            2000 in training, 1000 in evaluation; lesions are few, and a CPU gains from fewer:
            500 and 128 RoIs make a training step 1.6x faster than 1000 and 256).
        rois_per_image: proposals sampled per image for the box and mask heads (torchvision 512).

    Raises:
        MedsegUserError: torchvision is not installed, or a 3D patch.
    """
    if len(patch_size) != 2:
        raise MedsegUserError(f"maskrcnn is 2D: patch_size {list(patch_size)} has {len(patch_size)} axes")
    try:
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    except ImportError:
        raise MedsegUserError("maskrcnn needs torchvision (pip install 'medseg[architectures]')") from None
    fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    fpn.body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(fpn.body.conv1.weight, mode="fan_out", nonlinearity="relu")
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(
        fpn,
        num_classes=num_classes,
        min_size=min(patch_size),
        max_size=max(patch_size),
        image_mean=[0.0] * in_channels,
        image_std=[1.0] * in_channels,
        rpn_anchor_generator=anchors,
        box_detections_per_img=detections_per_image,
        rpn_pre_nms_top_n_train=proposals_per_image,
        rpn_post_nms_top_n_train=proposals_per_image,
        rpn_pre_nms_top_n_test=proposals_per_image,
        rpn_post_nms_top_n_test=proposals_per_image,
        box_batch_size_per_image=rois_per_image,
    )


def instance_targets(instance_map: np.ndarray, *, class_of: Mapping[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Mask R-CNN training targets of one 2D image from its instance map.

    Args:
        instance_map: ``(rows, columns)`` integers, 0 background, one id per object.
        class_of: class index of each instance id (default: every instance is class 1).

    Returns:
        ``boxes`` float32 ``(N, 4)`` as (x0, y0, x1, y1) with x along columns and x1 = last
        column + 1, ``labels`` int64 ``(N,)``, ``masks`` uint8 ``(N, rows, columns)``.
    """
    instance_map = np.asarray(instance_map)
    if instance_map.ndim != 2:
        raise ValueError(f"instance_targets needs a 2D instance map, got shape {instance_map.shape}")
    ids = [int(i) for i in np.unique(instance_map) if i != 0]
    boxes, labels, masks = [], [], []
    for instance in ids:
        mask = instance_map == instance
        rows, columns = np.nonzero(mask)
        boxes.append([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])
        labels.append(int(class_of[instance]) if class_of else 1)
        masks.append(mask)
    shape = instance_map.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks).astype(np.uint8))
        if masks
        else torch.zeros((0, *shape), dtype=torch.uint8),
    }


def instances_from_detections(
    detections: Mapping[str, Any],
    *,
    shape: Sequence[int],
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> tuple[np.ndarray, list[float], list[int]]:
    """An instance map from one image's Mask R-CNN detections (eval mode output).

    Args:
        detections: ``{"scores": (N,), "labels": (N,), "masks": (N, 1, rows, columns)}``.
        shape: ``(rows, columns)`` of the image.
        score_threshold: detections scoring below are dropped.
        mask_threshold: a mask probability above this is the object.

    Returns:
        ``(instance_map, scores, classes)``: ids 1..N by descending score (a pixel claimed by
        several masks keeps the first, highest-scoring one; a detection left with no pixel is
        dropped), and the score and class of each id in order.
    """
    scores = detections["scores"].detach().cpu().numpy()
    labels = detections["labels"].detach().cpu().numpy()
    masks = detections["masks"].detach().cpu().numpy()
    instance_map = np.zeros(tuple(shape), dtype=np.int32)
    kept_scores: list[float] = []
    kept_classes: list[int] = []
    for index in np.argsort(-scores, kind="stable"):
        if scores[index] < score_threshold:
            continue
        pixels = (masks[index, 0] > mask_threshold) & (instance_map == 0)
        if not pixels.any():
            continue
        kept_scores.append(float(scores[index]))
        kept_classes.append(int(labels[index]))
        instance_map[pixels] = len(kept_scores)
    return instance_map, kept_scores, kept_classes


def patch_targets(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Training targets of one 2D label patch of class indices: each connected component (8-connected)
    of each foreground class is an instance of that class (:func:`instance_targets`)."""
    from scipy import ndimage

    labels = np.asarray(labels)
    instance_map = np.zeros(labels.shape, dtype=np.int32)
    class_of: dict[int, int] = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value, structure=np.ones((3, 3), dtype=bool))
        first = len(class_of) + 1
        instance_map[components > 0] = components[components > 0] + (first - 1)
        class_of.update({first + k: int(value) for k in range(count)})
    return instance_targets(instance_map, class_of=class_of)


class MaskRCNNSegmenter(nn.Module):
    """A Mask R-CNN behind medseg's network interface (see the module docstring).

    Args:
        detector: torchvision's ``MaskRCNN`` (:func:`build_maskrcnn`).
        num_classes: classes, background included (the detector's classes are these indices).
    """

    #: trained on ``forward(images, labels)`` (:func:`medseg.model.objectives.make_objective`)
    computes_own_loss = True
    #: DDP: an image batch without objects leaves the mask head unused
    find_unused_parameters = True
    #: onnxruntime cannot run it through medseg's export (its outputs are per-image lists)
    onnx_exportable = False
    #: its instances are its detections (:mod:`medseg.inference.detections`), not connected components
    predicts_instances = True

    def __init__(self, detector: nn.Module, *, num_classes: int) -> None:
        super().__init__()
        self.detector = detector
        self.num_classes = int(num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Training (with ``labels`` ``(B, 1, H, W)``): the summed losses. Otherwise: ``(B, classes, H, W)`` log-scores."""
        batch = [image.float().contiguous() for image in images]
        if labels is not None:
            targets = [
                {k: v.to(images.device) for k, v in patch_targets(label[0].detach().cpu().numpy()).items()}
                for label in labels
            ]
            losses = self.detector(batch, targets)
            return sum(losses.values())
        if self.training:
            raise ValueError("MaskRCNNSegmenter in training mode needs labels")
        detections = self.detector(batch)
        return dense_log_scores(detections, num_classes=self.num_classes, shape=tuple(images.shape[-2:]))


def dense_log_scores(
    detections: Sequence[Mapping[str, torch.Tensor]], *, num_classes: int, shape: tuple[int, int]
) -> torch.Tensor:
    """``(B, classes, H, W)`` log-scores of each image's detections (see the module docstring)."""
    first = next((d["masks"] for d in detections if len(d["masks"])), None)
    device = first.device if first is not None else torch.device("cpu")
    scores = torch.zeros((len(detections), num_classes, *shape), dtype=torch.float32, device=device)
    for index, found in enumerate(detections):
        if not len(found["scores"]):
            continue
        weighted = found["scores"].float()[:, None, None] * found["masks"][:, 0].float()
        for value in found["labels"].unique().tolist():
            if 0 < value < num_classes:
                scores[index, value] = weighted[found["labels"] == value].amax(0)
    scores[:, 0] = 1.0 - scores[:, 1:].amax(1) if num_classes > 1 else 1.0
    return torch.log(scores.clamp_min(1e-6))


def build_maskrcnn_segmenter(
    network: Mapping[str, Any],
    *,
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    backbone_weights: bool = False,
) -> MaskRCNNSegmenter:
    """The :class:`MaskRCNNSegmenter` a plans ``network`` section describes (see
    :func:`medseg.planning.architectures.resnet_network_section`)."""
    options: dict[str, Any] = {}  # what the section leaves out keeps build_maskrcnn's default
    if "backbone" in network:
        options["backbone"] = str(network["backbone"])
    if "anchor_sizes" in network:
        options["anchor_sizes"] = tuple(int(a) for a in network["anchor_sizes"])
    for key in ("detections_per_image", "proposals_per_image", "rois_per_image"):
        if key in network:
            options[key] = int(network[key])
    detector = build_maskrcnn(in_channels=in_channels, num_classes=out_channels, patch_size=patch_size, **options)
    checkpoint = network.get("backbone_checkpoint")
    if backbone_weights and checkpoint:
        from medseg.model.architectures.encoders import load_backbone_checkpoint

        load_backbone_checkpoint(detector.backbone.body, checkpoint)
    return MaskRCNNSegmenter(detector, num_classes=out_channels)
