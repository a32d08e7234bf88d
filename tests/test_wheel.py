"""The package runs from a wheel: built from the committed files, installed non-editable into a fresh virtual environment.

The fresh environment reuses this one's dependencies through a `.pth` line (so no download and no minutes of
installing TensorFlow), and gets the wheel with `pip install --no-deps`. Python does not process `.pth` files of a
folder a `.pth` line adds, so this environment's editable install of fruitflow is not seen there: the checks
below make sure the installed copy, step notebooks included, is what runs.
"""
from __future__ import annotations
import importlib.util, os, shutil, subprocess, sys, sysconfig, zipfile
from pathlib import Path
import pytest
from conftest import FAST, ROOT, mlflow_client, runs

pytestmark = pytest.mark.xdist_group("wheel")  # its module-scoped fixtures: one worker runs the module

def sources(dst: Path) -> Path:
    "A copy of the repository's committed and new, not ignored, files (what a clone or `pip install git+URL` sees)."
    try: files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError): pytest.skip("not a git checkout")
    for f in files:
        if (ROOT/f).is_file(): (dst/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT/f, dst/f)
    return dst

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    "A fresh virtual environment with fruitflow's wheel installed: (its python, the wheel)."
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv = sources(tmp/"src"), tmp/"dist", tmp/"venv"
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # with setuptools here, build with it (offline)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", dist, src], check=True, capture_output=True, timeout=300)
    wheel, = dist.glob("fruitflow-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = venv/"bin"/"python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True).stdout.strip())
    (site/"project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # this environment's packages, after the fresh one's own
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)  # nothing may come from the sources it was built from
    return py, wheel

def test_the_wheel_carries_the_step_notebooks(installed):
    py, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.endswith(".ipynb")] == [f"fruitflow/nbs/{n}" for n in
            ("01_download.ipynb", "02_preprocess.ipynb", "03_train.ipynb", "04_evaluate.ipynb", "05_register.ipynb")], names
    got = subprocess.run([py, "-c", "import fruitflow, jupyter_client.kernelspec as k; from fruitflow.config import nbs_dir; "
                          "print(fruitflow.__file__); print(nbs_dir()); print(k.KernelSpecManager().get_kernel_spec('python3').argv[0])"],
                         capture_output=True, text=True, check=True, cwd="/").stdout.split()
    venv = py.parent.parent
    assert all(Path(p).is_relative_to(venv) for p in got), got  # the package, its notebooks and the kernel's python: the installed copy's
    assert Path(got[0]).parent/"nbs" == Path(got[1]), got

def test_the_installed_package_runs_the_pipeline(installed, tmp_path, prefect_api):
    py, _ = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "VIRTUAL_ENV"))} | {"PREFECT_API_URL": prefect_api}
    p = subprocess.run([py.parent/"fruitflow", "run", "--source", "synthetic", "--n-per-class", "8", *FAST], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = runs(tmp_path)[0]
    assert r.info.status == "FINISHED" and r.data.tags.get("registered_version") == "1", (r.info.status, r.data.tags)
    assert len(list(Path(r.data.tags["run_dir"]).glob("0[1-5]_*.ipynb"))) == 5
