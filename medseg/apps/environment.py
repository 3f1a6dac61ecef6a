"""What medseg runs on: library versions, compute device, optional extras (``medseg info``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

__all__ = ["environment_report", "OPTIONAL_EXTRAS"]

#: extra name -> (import name, what it enables)
OPTIONAL_EXTRAS: dict[str, tuple[str, str]] = {
    "sam": ("transformers", "medseg segment / train-sam / refine: SAM, SAM-HQ, SAM2, SAM3 from local checkpoints"),
    "dask": ("distributed", "--scheduler / --dask-local: predict and evaluate over a Dask cluster"),
    "onnx": ("onnxruntime", "medseg export --onnx, medseg predict --runtime onnx"),
    "dicom": ("highdicom", "DICOM-SEG out (--output-format dicom-seg) and in (evaluate --reference)"),
    "architectures": ("torchvision", "2D fcn / deeplabv3plus and maskrcnn (plan --architecture)"),
}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report(*, include_device: bool = True) -> dict[str, str]:
    """Versions and device as an ordered mapping of plain strings.

    Args:
        include_device: import torch to report CUDA devices (slower; torch is otherwise not
            imported).
    """
    from medseg import __version__

    report = {
        "medseg": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "monai": _version("monai"),
        "SimpleITK": _version("SimpleITK"),
        "nibabel": _version("nibabel"),
        "scikit-image": _version("scikit-image"),
    }
    if include_device:
        report["device"] = _device()
    for extra, (module, purpose) in OPTIONAL_EXTRAS.items():
        try:
            importlib.import_module(module)
            state = "available"
        except ImportError:
            state = f"not installed (pip install 'medseg[{extra}]')"
        except Exception as error:  # noqa: BLE001 - e.g. a torchvision built for another torch fails to load
            state = f"installed but fails to load ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        report[f"extra:{extra}"] = f"{state} - {purpose}"
    return report


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)}; CUDA {torch.version.cuda})"
    return f"cpu ({torch.get_num_threads()} threads)"
