"""Where networks run: the device choice every torch stage shares.

``"auto"`` takes the first CUDA GPU when torch sees one and the CPU otherwise; asking for
``"cuda"`` without a GPU is a user error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import torch

from medseg.errors import MedsegUserError

__all__ = ["PRECISIONS", "autocast_dtype", "cpu_has_native_bfloat16", "select_device"]

#: ``--precision`` choices: ``auto`` = mixed where the hardware computes it natively, else float32
PRECISIONS = ("auto", "float32", "mixed")


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegUserError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise MedsegUserError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def cpu_has_native_bfloat16() -> bool:
    """True when the CPU computes bfloat16 in hardware (Intel AMX or AVX512-BF16), as oneDNN uses it.

    Without it bfloat16 is emulated and slower than float32, so ``auto`` precision stays float32.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's capability probes
    for name in checks:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
            continue
    return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype the network runs in on ``device``, or ``None`` for plain float32.

    ``"mixed"``: float16 on CUDA, bfloat16 on the CPU. ``"auto"``: the same where the hardware
    computes it natively (every CUDA GPU; CPUs with AMX or AVX512-BF16), float32 elsewhere.
    ``"float32"``: never autocast. Accumulation, blending and softmax stay float32 either way.

    Raises:
        MedsegUserError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise MedsegUserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    if device.type == "cuda":
        return torch.float16
    if precision == "mixed" or cpu_has_native_bfloat16():
        return torch.bfloat16
    return None
