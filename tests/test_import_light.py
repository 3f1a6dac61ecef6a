"""The core never imports torch: evaluation works in a light environment and starts fast."""

from __future__ import annotations

import subprocess
import sys

#: every module of the packages below the torch line (see the import-linter contracts)
LIGHT_PACKAGES = ["medseg.core", "medseg.io", "medseg.data", "medseg.metrics", "medseg.evaluation"]
CORE_MODULES = ["medseg.errors", "medseg.cli", "medseg.apps.environment", *LIGHT_PACKAGES]


def test_core_modules_do_not_import_torch() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    for info in pkgutil.iter_modules(getattr(module, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "import medseg\n"
        "medseg.read_volume, medseg.load_manifest, medseg.LabelSet, medseg.evaluate, medseg.summarize\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_evaluate_is_the_function_even_after_importing_the_module() -> None:
    import medseg
    import medseg.evaluation  # noqa: F401

    assert callable(medseg.evaluate) and medseg.evaluate.__module__ == "medseg.evaluation.batch"
