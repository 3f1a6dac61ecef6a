"""Promptable segmentation with the Segment-Anything family, and SAM-prompted refinement of U-Net masks.

Sits above :mod:`medseg.inference`: it may use the U-Net's predictions, and nothing below it imports
it. Backends (``transformers`` SAM/SAM-HQ/SAM2/SAM3 folders, original ``.pth`` checkpoints) load only
from local files; prompts are plain numpy; the refinement gate keeps SAM's answer only where it was
measured to help.
"""
