"""The distributions that a release publishes: built, checked, installed and imported.

``python -m build --no-isolation`` (no network: .venv's setuptools) makes the sdist and, from
it, the wheel; ``twine check --strict`` passes on both. The wheel is installed with
``--no-deps --no-index`` into a fresh virtual environment that sees the test environment's
packages (a ``.pth`` file listing them: torch and the rest are not installed twice) but neither
this source tree nor the editable install of mini, and a script run from an empty folder
imports every module of mini from it and loads a checkpoint asset. A file missing from the
wheel (a module, the checkpoint assets, a kernel) fails here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DIST = PROJECT["name"].replace("-", "_")

# Run inside the fresh environment, from an empty folder: what a user of the wheel gets.
IMPORT_ALL = r'''
import importlib, json, pkgutil, sys
import mini
failed = {}
names = ["mini"] + [m.name for m in pkgutil.walk_packages(
    mini.__path__, "mini.", onerror=lambda name: failed.setdefault(name, "walk failed"))]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:  # reported, not raised: every failure at once
        failed[name] = f"{type(err).__name__}: {err}"
from mini import assets
names_ = assets.list_assets()
asset = "tiny-llama-corpus-300" if "tiny-llama-corpus-300" in names_ else names_[0]
model = assets.load_asset(asset)
files = {n: getattr(m, "__file__", None) or "" for n, m in sys.modules.items()
         if n == "mini" or n.startswith("mini.")}
print(json.dumps({"file": mini.__file__, "modules": names, "failed": failed, "asset": asset,
                  "parameters": sum(p.numel() for p in model.parameters()), "files": files,
                  "finders": [type(f).__name__ for f in sys.meta_path], "path": sys.path}))
'''


def _source_files() -> list[str]:
    """mini's files as the wheel must carry them (modules and package data, no caches)."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mini").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheel, = out.glob(f"{DIST}-{PROJECT['version']}-py3-none-any.whl")
    sdist, = out.glob(f"{DIST}-{PROJECT['version']}.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_twine_check_passes(dists):
    res = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dists["wheel"]),
                          str(dists["sdist"])], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("PASSED") == 2, res.stdout


def test_wheel_carries_every_module_asset_and_kernel(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    source = _source_files()
    missing = [f for f in source if f not in names]
    assert not missing, f"in mini/ but not in the wheel: {missing}"
    assets = [f for f in source if f.startswith("mini/checkpoints/")]
    assert len(assets) >= 3 and any(f.endswith("/model.safetensors") for f in assets), assets
    kernels = [f for f in source if f.endswith(".py") and "@triton.jit" in (ROOT / f).read_text()]
    assert len(kernels) >= 5, kernels  # the Triton kernel modules (cogo, quant, sltrain, spinquant...)
    assert not [n for n in names if not n.startswith(("mini/", f"{DIST}-"))], "only mini in the wheel"
    meta = zipfile.ZipFile(dists["wheel"]).read(f"{DIST}-{PROJECT['version']}.dist-info/METADATA").decode()
    assert f"Name: {PROJECT['name']}" in meta and "Provides-Extra: labs" in meta


def test_wheel_installs_and_imports_every_module_without_the_source_tree(dists, tmp_path):
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The test environment's packages, after the fresh environment's own; a path in a .pth file
    # does not run that folder's .pth files, so the editable finder of mini stays out.
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "test_env.pth").write_text("\n".join(parents) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1",
               MINI_THREADS="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                          "--no-index", str(dists["wheel"])], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    work = tmp_path / "cwd"
    work.mkdir()
    res = subprocess.run([str(py), "-c", IMPORT_ALL], check=False, capture_output=True, text=True, env=env, cwd=work,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(env_dir), f"mini imported from {report['file']}"
    outside = {n: f for n, f in report["files"].items() if not Path(f).is_relative_to(site)}
    assert not outside, f"modules of mini not from the installed wheel: {outside}"
    assert not any("editable" in f.lower() for f in report["finders"]), report["finders"]
    assert str(ROOT) not in report["path"] and str(ROOT / "mini") not in report["path"]
    assert not report["failed"], f"modules of the wheel that fail to import: {report['failed']}"
    expected = {f[:-3].replace("/", ".").removesuffix(".__init__") for f in _source_files()
                if f.endswith(".py")}
    assert set(report["modules"]) == expected
    assert report["parameters"] > 0, report  # the asset, sha256-checked and loaded
