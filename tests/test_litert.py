"""The registered model without TensorFlow (issue 46): its LiteRT copy answers as Keras does on the 2,014 shared
real photos, and the champion loads, predicts and serves in a virtual environment that has no TensorFlow.

The model is the default one on photos (EfficientNet-Lite0) from a real `fruitflow run` on the lab's photos;
the virtual environment is built here with pip from the version's own `requirements.txt`, as MLflow's
`virtualenv` environment manager would, plus fruitflow's code without its dependencies (and the two packages its
command line imports that MLflow does not bring: python-multipart, jupyter_client).
"""
from __future__ import annotations
import base64, contextlib, json, os, subprocess, sys, urllib.request
from pathlib import Path
import pytest
from fastcore.xtras import modified_env
from conftest import LAB_IMAGES, ROOT, free_port, fruitflow, server_process

pytestmark = pytest.mark.xdist_group("litert")  # its module-scoped run: one worker runs the module
REAL_PHOTOS = ROOT.parent/"shared"/"data"/"real-photos"
PHOTOS = [LAB_IMAGES/"apples"/"apple-1.jpeg", LAB_IMAGES/"oranges"/"orange-6.jpeg"]

def clean_env(**extra) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "VIRTUAL_ENV"))} | extra

@pytest.fixture(scope="module")
def champion(tmp_path_factory, prefect_api):
    "(workdir, registry URI) of a run on the lab's photos whose efficientnet became the champion."
    if not LAB_IMAGES.is_dir(): pytest.skip(f"{LAB_IMAGES} is missing")
    wd = tmp_path_factory.mktemp("litert")
    p = fruitflow("run", "--source", LAB_IMAGES, workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0 and "as @champion" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    return wd, f"sqlite:///{wd}/mlflow.db"

@contextlib.contextmanager
def tracking(uri: str):
    "MLflow's tracking and registry URI `uri` in this process for the block (MLflow's own `load_model` reads them)."
    import mlflow
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    try:
        with modified_env(MLFLOW_TRACKING_URI=uri): yield
    finally: mlflow.set_tracking_uri(old[0]); mlflow.set_registry_uri(old[1])

def load(uri: str, runtime: str):
    from fruitflow.serve import load_model
    with tracking(uri): return load_model("models:/fruitflow@champion", runtime)

@pytest.mark.long
def test_the_litert_copy_answers_as_keras_on_every_real_photo(champion):
    import numpy as np, pandas as pd
    if not REAL_PHOTOS.is_dir(): pytest.skip(f"{REAL_PHOTOS} is missing")
    _, uri = champion
    (lite, info), (keras, kinfo) = load(uri, "litert"), load(uri, "keras")
    assert (info["runtime"], kinfo["runtime"]) == ("litert", "keras")
    photos = pd.DataFrame({"image": [p.read_bytes() for p in sorted(REAL_PHOTOS.rglob("*.jpg"))]})
    assert len(photos) == 2014
    a, b = lite.predict(photos), keras.predict(photos)
    assert (a.label == b.label).all(), int((a.label != b.label).sum())
    off = max(float(np.abs(a[c] - b[c]).max()) for c in ("p_apple", "p_orange"))
    assert off <= 1e-4, off

@pytest.mark.long
def test_the_champion_loads_predicts_and_serves_without_tensorflow(champion, tmp_path):
    wd, uri = champion
    import mlflow
    with tracking(uri): req = Path(mlflow.artifacts.download_artifacts("models:/fruitflow@champion/requirements.txt", dst_path=str(tmp_path)))
    pins = req.read_text().split()
    assert any(p.startswith("ai-edge-litert==") for p in pins) and not any(p.startswith(("tensorflow", "keras")) for p in pins), pins
    venv = tmp_path/"venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [venv/"bin"/"python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    got = subprocess.run([*pip, "-r", req, "python-multipart", "jupyter_client"],  # what `fruitflow`'s command line imports besides
                         capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    got = subprocess.run([*pip, "--no-deps", ROOT], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    py, env = venv/"bin"/"python", clean_env(MLFLOW_TRACKING_URI=uri, VIRTUAL_ENV=str(venv),  # as if activated: `mlflow models
                                             PATH=f"{venv/'bin'}:{os.environ['PATH']}")  # serve` runs its `uvicorn` by name
    code = ("import importlib.util, json, sys, mlflow, pandas as pd; assert not importlib.util.find_spec('tensorflow') and not importlib.util.find_spec('keras'); "
            "m = mlflow.pyfunc.load_model('models:/fruitflow@champion'); "
            "out = m.predict(pd.DataFrame({'image': [open(p, 'rb').read() for p in sys.argv[1:]]})); "
            "print(json.dumps([m.unwrap_python_model().runtime, list(out.label), 'tensorflow' in sys.modules]))")
    got = subprocess.run([py, "-c", code, *map(str, PHOTOS)], cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout.splitlines()[-1]) == ["litert", ["apple", "orange"], False], got.stdout

    p = subprocess.run([venv/"bin"/"fruitflow", "predict", "--json", *PHOTOS], cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and [json.loads(l)["label"] for l in p.stdout.splitlines()] == ["apple", "orange"], p.stdout + p.stderr

    port = free_port()
    with server_process([venv/"bin"/"fruitflow", "serve", "--port", port], f"http://127.0.0.1:{port}/health", tmp_path/"serve.log", cwd=wd, env=env):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=30) as r: assert json.loads(r.read())["runtime"] == "litert"
        r = urllib.request.Request(f"http://127.0.0.1:{port}/predict", PHOTOS[1].read_bytes(), {"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(r, timeout=60) as r: assert json.loads(r.read())["predictions"][0]["label"] == "orange"

    port = free_port()
    cmd = [venv/"bin"/"mlflow", "models", "serve", "-m", "models:/fruitflow@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", port]
    with server_process(cmd, f"http://127.0.0.1:{port}/ping", tmp_path/"mlflow-serve.log", cwd=wd, env=env):
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()] for p in PHOTOS]}}
        r = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=60) as r: assert [p["label"] for p in json.loads(r.read())["predictions"]] == ["apple", "orange"]
    assert "Traceback" not in (tmp_path/"mlflow-serve.log").read_text()  # (no TensorFlow to import: `find_spec` above)
