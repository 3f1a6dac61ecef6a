"""Shared pytest fixtures: tiny synthetic volumes, the shared real data, GPU detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA (the reason is printed), and shared-data tests without data."""
    gpu_available = None
    for item in items:
        if "gpu" in item.keywords:
            if gpu_available is None:
                try:
                    import torch

                    gpu_available = bool(torch.cuda.is_available())
                except ImportError:
                    gpu_available = False
            if not gpu_available:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"shared data not found at {SHARED_DATA}"))


@pytest.fixture
def one_torch_thread():
    """Tiny networks gain nothing from more threads, and a shared CPU loses a lot (OpenMP spinning)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def rotation_matrix(angles_rad: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation from Euler angles about x, y, z."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(spacing_mm=(0.7, 1.1, 3.0), origin=(-12.5, 30.25, 7.0), angles=(0.3, -0.2, 0.5)) -> np.ndarray:
    """An oblique, anisotropic voxel-to-RAS affine with float32-exact entries."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(angles) @ np.diag(spacing_mm)
    affine[:3, 3] = origin
    return affine.astype(np.float32).astype(np.float64)


@pytest.fixture
def oblique() -> np.ndarray:
    return oblique_affine()


def make_dataset(root: Path, *, num_cases: int = 3, shape=(8, 9, 7), labels=None) -> Path:
    """Write a tiny MSD-style dataset (NIfTI images + labels + dataset.json) under ``root``."""
    import json

    from medseg.core.volume import Volume
    from medseg.io import write_volume

    rng = np.random.default_rng(1)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = oblique_affine()
    training = []
    for index in range(num_cases):
        name = f"case_{index:03d}.nii.gz"
        image = Volume(rng.normal(size=(1, *shape)).astype(np.float32), affine)
        label = np.zeros((1, *shape), np.uint8)
        label[0, 2:5, 2:6, 1:4] = 1
        label[0, 5:7, 2:6, 1:4] = 2
        write_volume(image, root / "imagesTr" / name)
        write_volume(image.with_array(label, kind="label"), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "front", "2": "back"},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return root / "dataset.json"
