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
]


def test_core_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "import medseg\n"
        "medseg.read_volume, medseg.load_manifest, medseg.LabelSet\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
