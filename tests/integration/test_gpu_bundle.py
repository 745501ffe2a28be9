"""bench/gpu_suite.py's wheel bundle installs on the reference GPU machine (issue 32: it lacked packages, and pins of
the machine's own packages, pyarrow's and huggingface-hub's, ruled out its datasets, so `--wheels` stopped before the
first row). pip's dry run of install_bundle's own install, offline (`--no-index --find-links BUNDLE`), from a Python
3.12 (the machine's) in a virtual environment holding the machine's packages at their versions as metadata alone
(gpu_suite.GPU_MACHINE, from ../shared/GPU.md): about 20 s. The bundle's wheels (about 55 MB) come from PyPI once and
stay under .cache/, named by what they are; without PyPI or a Python 3.12 the test says so and skips."""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402 - bench/ is not a package


def cached_bundle() -> Path:
    """The wheels bundle_wheels makes, made once per bundle_specs (each name at its version) and kept."""
    specs = gpu_suite.bundle_specs()
    folder = ROOT / ".cache" / f"gpu-bundle-{hashlib.sha256(json.dumps(specs).encode()).hexdigest()[:12]}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as td:
        try:
            gpu_suite.bundle_wheels(Path(td) / "wheels")
        except subprocess.CalledProcessError as e:
            pytest.skip(f"the wheel bundle cannot be made here: {' '.join(map(str, e.cmd[3:5]))} from PyPI failed "
                        "(offline?); with PyPI, `python bench/gpu_suite.py --make-bundle DIR` makes it")  # fmt: skip
        for stale in folder.parent.glob("gpu-bundle-*"):  # an older bundle's 55 MB
            shutil.rmtree(stale)
        (Path(td) / "wheels").rename(folder)
    return folder


def test_the_bundle_installs_over_the_gpu_machines_packages():
    python = gpu_suite.python312()
    if python is None:
        pytest.skip("no Python 3.12 here (the GPU machine's: the bundle's wheels are for it) to check the install with")
    resolved, said = gpu_suite.check_bundle(cached_bundle(), python)
    assert resolved, f"pip could not install from the bundle over the GPU machine's packages:\n{said}"
    # What the suite runs comes from the bundle at the versions tested here, and the machine keeps its own torch,
    # transformers and pyarrow (a bundle that replaced them would not be the machine GPU.md describes).
    would = said.removeprefix("Would install ").split()
    for name in ("peft", "trl", "datasets", "bitsandbytes", "fastapi", "liger_kernel", "rouge_score"):
        assert any(w.startswith(f"{name}-") for w in would), (name, said)
    assert not [w for w in would if w.startswith(("torch-", "transformers-", "pyarrow-", "accelerate-"))], said
