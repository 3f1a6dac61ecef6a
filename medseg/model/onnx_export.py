"""ONNX: export a planned network (verified against PyTorch) and run it with onnxruntime as a network.

* **Export** (:func:`export_network`): ``torch.onnx.export`` (opset :data:`ONNX_OPSET`, the
  TorchScript exporter, which takes ~5 s for a hippocampus U-Net where the dynamo exporter takes
  ~30 s; dynamo is the fallback), with the batch axis and every spatial axis dynamic, so one file
  serves any window size and any TTA batch. The result is **verified** on a random input of two
  windows of the plans' patch size: the largest absolute logit difference from PyTorch must be
  at most :data:`LOGIT_TOLERANCE` x max(1, largest absolute PyTorch logit); the measured
  difference is returned (and printed by ``medseg export --onnx``).
* **Runtime** (:class:`OnnxNetwork`): an ``nn.Module`` whose forward runs an onnxruntime session
  (``CPUExecutionProvider``, ``intra_op_num_threads`` = ``threads``). It is handed to the same
  sliding-window engine as the PyTorch network (:func:`medseg.model.windows.sliding_window_logits`),
  so windows, Gaussian blending and mirroring TTA stay one implementation.
* **Cache** (:func:`cached_onnx_network`): ``checkpoint_last.pt`` is exported on first use to
  ``checkpoint_last.onnx`` beside it (written atomically), carrying the checkpoint's SHA-256 and
  :data:`ONNX_EXPORT_VERSION` in its metadata; a cache made for another checkpoint hash or export
  version is exported again, and a cache whose metadata match is used only after one random window
  through it and through PyTorch agrees within the tolerance (a file edited or damaged since is
  exported again). A folder that cannot be written keeps the export in memory only.
* **Choosing the runtime** (:func:`choose_runtime`): ``auto`` is PyTorch unless
  :data:`AUTO_PREFERS_ONNX` says onnxruntime is the faster one on the CPU (then ``onnx`` whenever
  the network runs on the CPU and onnxruntime is installed; CUDA always keeps PyTorch with float16
  autocast). Measured here (onnxruntime 1.32, torch 2.13, MSD Hippocampus U-Net with filters
  16-128 and 40x56x40 windows, one thread, CPU seconds on a shared 2-core machine): one window
  0.253 s (onnx) vs 0.264 s (torch), 2 windows 0.54 vs 0.37 s, 16 windows 4.14 vs 3.56 s, a whole
  case with TTA 2.11 vs 1.68 s. onnxruntime was not faster, so ``auto`` keeps PyTorch;
  ``benchmarks/bench_predict.py --runtime torch onnx`` measures both on a quiet machine, and the
  rule is this one constant. Predictions agree: logits within 1e-4, the same labels.

Example:
    >>> onnx_bytes, diff = export_network(net, plans_config=cfg, in_channels=1)    # doctest: +SKIP
    >>> logits = OnnxNetwork(onnx_bytes, threads=2)(torch.zeros(1, 1, 40, 56, 40)) # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import io
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medseg import __version__
from medseg.errors import CheckpointError, MedsegUserError, OutputError
from medseg.io.files import atomic_path

__all__ = [
    "CHECKPOINT_SHA256_KEY",
    "AUTO_PREFERS_ONNX",
    "ONNX_OPSET",
    "ONNX_EXPORT_VERSION",
    "LOGIT_TOLERANCE",
    "RUNTIMES",
    "OnnxVerification",
    "OnnxNetwork",
    "onnxruntime_available",
    "choose_runtime",
    "export_network",
    "onnx_cache_path",
    "cached_onnx_network",
]

ONNX_OPSET = 17
#: bump when the exported graph changes: caches of an older version are exported again
ONNX_EXPORT_VERSION = 1
#: largest allowed |ONNX logit - PyTorch logit|, relative to max(1, max |PyTorch logit|)
LOGIT_TOLERANCE = 1e-4
RUNTIMES = ("auto", "torch", "onnx")
#: whether ``--runtime auto`` picks onnxruntime on the CPU (see the module docstring for the measurements)
AUTO_PREFERS_ONNX = False
_INSTALL_HINT = "pip install 'medseg[onnx]' (onnx, onnxruntime, onnxscript)"
#: metadata key of the SHA-256 of the checkpoint an export was made from (the cache key)
CHECKPOINT_SHA256_KEY = "medseg_checkpoint_sha256"
_META_VERSION = "medseg_onnx_export_version"


@dataclass(frozen=True)
class OnnxVerification:
    """How an export was checked: the largest logit difference from PyTorch and the allowed one."""

    max_abs_diff: float
    tolerance: float
    max_abs_logit: float
    input_shape: tuple[int, ...]
    export_s: float

    def line(self) -> str:
        """One line for the user."""
        return (
            f"verified against PyTorch on a random {'x'.join(map(str, self.input_shape))} input: "
            f"max |logit difference| {self.max_abs_diff:.2e} <= {self.tolerance:.2e} "
            f"(max |logit| {self.max_abs_logit:.3g}); export {self.export_s:.1f} s"
        )


def onnxruntime_available() -> bool:
    """Whether onnxruntime and onnx are installed (without importing them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def _import_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401  (the export writes metadata with it)
        import onnxruntime
    except ImportError:
        raise MedsegUserError(
            f"--runtime onnx needs onnxruntime and onnx, which are not installed: {_INSTALL_HINT}"
        ) from None
    return onnxruntime


def choose_runtime(runtime: str, *, device: torch.device) -> str:
    """``"torch"`` or ``"onnx"`` for a requested ``runtime`` (``auto``/``torch``/``onnx``) on ``device``.

    Raises:
        MedsegUserError: an unknown runtime; ``onnx`` on CUDA; ``onnx`` without onnxruntime.
    """
    if runtime not in RUNTIMES:
        raise MedsegUserError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if runtime == "torch":
        return "torch"
    if runtime == "auto":
        return "onnx" if AUTO_PREFERS_ONNX and device.type == "cpu" and onnxruntime_available() else "torch"
    if device.type != "cpu":
        raise MedsegUserError(f"--runtime onnx runs on the CPU, not {device.type}; use --device cpu or --runtime torch")
    _import_onnxruntime()
    return "onnx"


def _session(model: bytes, threads: int | None) -> Any:
    onnxruntime = _import_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)  # 0: onnxruntime's default (one per core)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxNetwork(nn.Module):
    """An exported network run by onnxruntime on the CPU, called like the PyTorch network.

    Args:
        model: the ONNX file's bytes.
        threads: onnxruntime intra-op threads (None: one per core).
        metadata: the model's metadata (checkpoint hash, export version), for provenance.
    """

    def __init__(self, model: bytes, *, threads: int | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__()
        self.model = bytes(model)
        self.threads = threads
        self.metadata = dict(metadata or {})
        self._session: Any = None

    def _runner(self) -> Any:
        if self._session is None:
            self._session = _session(self.model, self.threads)
        return self._session

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        session = self._runner()
        array = windows.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run(None, {session.get_inputs()[0].name: array})
        return torch.from_numpy(logits)

    def __getstate__(self) -> dict[str, Any]:  # sessions do not pickle; a worker makes its own
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def extra_repr(self) -> str:
        return f"onnxruntime, {len(self.model) / 1e6:.1f} MB, threads={self.threads}"


def _torch_export(network: nn.Module, example: torch.Tensor) -> bytes:
    spatial = example.ndim - 2
    names = ["x", "y", "z"][:spatial]
    axes = {0: "batch", **{2 + a: names[a] for a in range(spatial)}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                network,
                (example,),
                buffer,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": axes, "logits": axes},
            )
        except Exception:  # a torch without the TorchScript exporter: the dynamo one
            buffer = io.BytesIO()
            dim = torch.export.Dim.DYNAMIC
            program = torch.onnx.export(
                network,
                (example,),
                dynamo=True,
                opset_version=max(ONNX_OPSET, 18),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"x": {axis: dim for axis in axes}},
            )
            program.save(buffer)
    return buffer.getvalue()


def _with_metadata(model: bytes, metadata: Mapping[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(model)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return proto.SerializeToString()


@torch.no_grad()
def export_network(
    network: nn.Module,
    *,
    plans_config: Mapping[str, Any],
    in_channels: int,
    metadata: Mapping[str, str] | None = None,
    source: str = "network",
    threads: int | None = None,
    seed: int = 0,
) -> tuple[bytes, OnnxVerification]:
    """Export ``network`` to ONNX and verify it against PyTorch (see the module docstring).

    Args:
        network: the planned network (moved to the CPU and put in eval mode).
        plans_config: its configuration of the plans (``patch_size`` sizes the check input).
        in_channels: image channels.
        metadata: strings stored in the model's ``metadata_props``.
        source: what to name in an error (the checkpoint's path).
        threads: onnxruntime threads for the check.
        seed: seed of the random check input.

    Returns:
        The ONNX file's bytes and the verification.

    Raises:
        MedsegUserError: onnx or onnxruntime missing.
        CheckpointError: the export differs from PyTorch by more than the tolerance.
    """
    if not getattr(network, "onnx_exportable", True):
        raise MedsegUserError(f"{source}: a {type(network).__name__} does not export to ONNX; use --runtime torch")
    _import_onnxruntime()
    network = network.to("cpu").eval()
    patch = [int(p) for p in plans_config["patch_size"]]
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn((2, in_channels, *patch), generator=generator)
    clock = time.perf_counter()
    model = _torch_export(network, example[:1])
    model = _with_metadata(
        model, {"medseg_version": __version__, _META_VERSION: str(ONNX_EXPORT_VERSION), **(metadata or {})}
    )
    export_s = time.perf_counter() - clock
    return model, _verify(model, network, example, source=source, threads=threads, export_s=export_s)


def _verify(
    model: bytes, network: nn.Module, example: torch.Tensor, *, source: str, threads: int | None, export_s: float
) -> OnnxVerification:
    """Run ``example`` through both and compare (see the module docstring); CheckpointError beyond tolerance."""
    with torch.no_grad():
        expected = network(example).float()
    got = OnnxNetwork(model, threads=threads)(example)
    if got.shape != expected.shape:
        raise CheckpointError(
            f"{source}: the ONNX export returns shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    max_abs_diff = float((got - expected).abs().max())
    max_abs_logit = float(expected.abs().max())
    tolerance = LOGIT_TOLERANCE * max(1.0, max_abs_logit)
    if not max_abs_diff <= tolerance:
        raise CheckpointError(
            f"{source}: the ONNX export differs from PyTorch by {max_abs_diff:.3g} (tolerance {tolerance:.3g}); "
            "use --runtime torch"
        )
    return OnnxVerification(
        max_abs_diff=max_abs_diff,
        tolerance=tolerance,
        max_abs_logit=max_abs_logit,
        input_shape=tuple(example.shape),
        export_s=round(export_s, 3),
    )


def onnx_cache_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the ONNX export of a checkpoint is cached: beside it, ``.pt`` -> ``.onnx``."""
    return Path(checkpoint).with_suffix(".onnx")


def _cached_metadata(model: bytes) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load_from_string(model)
    except Exception:  # a damaged cache is only a cache miss
        return {}
    return {entry.key: entry.value for entry in proto.metadata_props}


def cached_onnx_network(
    network: nn.Module,
    *,
    checkpoint: str | os.PathLike[str],
    sha256: str,
    plans_config: Mapping[str, Any],
    in_channels: int,
    threads: int | None = None,
) -> OnnxNetwork:
    """The onnxruntime network of a checkpoint, exported on first use and cached beside it.

    Args:
        network: the PyTorch network loaded from ``checkpoint`` (exported on a cache miss).
        checkpoint: the checkpoint file.
        sha256: its SHA-256; the cache is used only when its metadata carries the same.
        plans_config: the network's configuration of the plans.
        in_channels: image channels.
        threads: onnxruntime intra-op threads.
    """
    cache = onnx_cache_path(checkpoint)
    if cache.is_file():
        try:
            model = cache.read_bytes()
        except OSError:
            model = b""
        metadata = _cached_metadata(model) if model else {}
        if metadata.get(CHECKPOINT_SHA256_KEY) == sha256 and metadata.get(_META_VERSION) == str(ONNX_EXPORT_VERSION):
            # the metadata names the checkpoint, but anyone could have written the file: one window
            # through both runtimes proves it computes this network (else it is exported again)
            network = network.to("cpu").eval()
            patch = [int(p) for p in plans_config["patch_size"]]
            example = torch.randn((1, in_channels, *patch), generator=torch.Generator().manual_seed(1))
            try:
                _verify(model, network, example, source=str(cache), threads=threads, export_s=0.0)
                return OnnxNetwork(model, threads=threads, metadata=metadata)
            except Exception:  # noqa: BLE001 - a cache that fails the check (or does not load) is a miss
                pass
    model, _ = export_network(
        network,
        plans_config=plans_config,
        in_channels=in_channels,
        metadata={CHECKPOINT_SHA256_KEY: sha256},
        source=str(checkpoint),
        threads=threads,
    )
    try:
        with atomic_path(cache) as temporary:
            temporary.write_bytes(model)
    except OutputError:
        pass  # a read-only run folder: the export is used from memory this time
    return OnnxNetwork(model, threads=threads, metadata=_cached_metadata(model))
