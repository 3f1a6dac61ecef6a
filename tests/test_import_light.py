"""The core never imports torch: evaluation works in a light environment and starts fast."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = [
    "medseg",
    "medseg.volume",
    "medseg.io",
    "medseg.labels",
    "medseg.manifest",
    "medseg.check",
    "medseg.errors",
    "medseg.cli",
    "medseg.environment",
    "medseg.evaluation",
    "medseg.report",
    "medseg.resample",
    "medseg.consensus",
    "medseg.metrics",
    "medseg.metrics.overlap",
    "medseg.metrics.surface",
    "medseg.metrics.instances",
]


def test_core_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "import medseg\n"
        "medseg.read_volume, medseg.load_manifest, medseg.LabelSet, medseg.evaluate, medseg.summarize\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_evaluate_is_the_function_even_after_importing_the_module() -> None:
    import medseg
    import medseg.evaluation  # noqa: F401

    assert callable(medseg.evaluate) and medseg.evaluate.__module__ == "medseg.evaluation"
