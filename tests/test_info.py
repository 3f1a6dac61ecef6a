"""``medseg info``: versions, device and every optional extra, including one installed but broken."""

from __future__ import annotations

import importlib

from medseg.apps import environment
from medseg.cli import main


def test_info_names_each_extra_and_says_when_one_fails_to_load(monkeypatch, capsys) -> None:
    real_import = importlib.import_module

    def import_module(name: str, *args, **kwargs):
        if name == "torchvision":  # a torchvision built for another torch build fails with an OSError
            raise OSError("libtorch_cuda.so: cannot open shared object file\nmore detail")
        if name == "highdicom":
            raise ImportError("No module named 'highdicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(environment.importlib, "import_module", import_module)
    assert main(["info"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert set(environment.OPTIONAL_EXTRAS) == {key.removeprefix("extra:") for key in lines if key.startswith("extra:")}
    assert "installed but fails to load (OSError: libtorch_cuda.so: cannot open" in lines["extra:architectures"]
    assert "more detail" not in lines["extra:architectures"]  # one line
    assert "not installed (pip install 'medseg[dicom]')" in lines["extra:dicom"]
    assert lines["torch"].split()[1][0].isdigit()
