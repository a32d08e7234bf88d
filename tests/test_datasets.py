"""Datasets as a new user brings them, through `fruitflow run`, `predict` and `serve`: real photos in class folders.

An empty class folder, or one without a usable image, stops the run naming it, and nothing is registered.
Apples-and-oranges data gets one class vocabulary whatever its folders' spelling (`Apples/` → `apple`), with a
third class (`Lemons/` → `lemon`) too; the registered version records its class names, and predict and serve
answer with the names of the model they load. A set too small for `--min-test-images` makes no champion.
"""
from __future__ import annotations
import http.client, json, os, shutil
from pathlib import Path
import numpy as np
import pytest
from PIL import Image, ImageDraw
from conftest import BIN, FAST, ROOT, free_port, fruitflow, mlflow_client, runs, server_process

pytestmark = pytest.mark.xdist_group("three_classes")  # its module-scoped fixtures: one worker runs the module

REAL = next((p for p in (ROOT.parent/"shared"/"data"/"real-photos", Path("/work/shared/data/real-photos")) if p.is_dir()), None)
N = 14  # photos a class: 1 test and 3 validation images each

def lemon(seed: int, size: int = 96) -> Image.Image:
    "A yellow oval with pointed ends on a plain backdrop: a third kind of fruit the synthetic generator cannot draw."
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 200, 3)))
    d, r = ImageDraw.Draw(im), size * rng.uniform(0.25, 0.4)
    cx, cy = size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8)
    colour = (int(rng.integers(220, 256)), int(rng.integers(200, 240)), int(rng.integers(20, 90)))
    d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=colour)
    for s in (-1, 1): d.polygon([(cx + s * r * 0.9, cy - r * 0.2), (cx + s * r * 1.2, cy), (cx + s * r * 0.9, cy + r * 0.2)], fill=colour)
    return im

def dataset(root: Path, folders: dict[str, str]) -> Path:
    "A folder source: each class folder named as given, filled with `N` real photos of `apples` or `oranges`, drawn `lemons`, or left `empty`."
    if REAL is None: pytest.skip("the real photos (shared/data/real-photos) are missing")
    for name, kind in folders.items():
        (d := root/name).mkdir(parents=True)
        if kind == "lemons":
            for i in range(N): lemon(i).save(d/f"lemon-{i}.jpg")
        elif kind != "empty":
            for p in sorted((REAL/kind).iterdir())[:N]: shutil.copy(p, d/p.name)
    return root

def post(url: str, body: bytes) -> tuple[int, bytes]:
    "POST `body` as a JPEG to `url`/predict: (status, answer)."
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        c.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
        r = c.getresponse()
        return r.status, r.read()
    finally: c.close()

def one_line(p) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    return lines[0]

@pytest.mark.parametrize("oranges, step, says", [("empty", "download", "class 'oranges' ({}) is an empty folder"),
                                                 ("no photo", "preprocess", "class 'orange' ({}) has 0 usable images")])
def test_a_class_without_images_stops_the_run_and_registers_nothing(tmp_path, prefect_api, oranges, step, says):
    src = dataset(tmp_path/"photos", {"apples": "apples", "oranges": "empty"})
    if oranges == "no photo":
        (src/"oranges"/"notes.txt").write_text("not a photo"); (src/"oranges"/".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (wd := tmp_path/"work").mkdir()
    line = one_line(fruitflow("run", "--source", src, *FAST, workdir=wd, env={"PREFECT_API_URL": prefect_api}))
    assert f"step '{step}' failed" in line and says.format(src/"oranges") in line, line
    (run,) = runs(wd)
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == step
    assert "n_train" not in run.data.metrics  # stopped before training
    assert mlflow_client(wd).search_model_versions("name='fruitflow'") == []

@pytest.fixture(scope="module")
def three_classes(tmp_path_factory, prefect_api):
    "A run on `Apples/` and `oranges/` (real photos) and `Lemons/`, synthetic mixing asked for: (workdir, completed process, MLflow run)."
    root = tmp_path_factory.mktemp("three")
    src = dataset(root/"photos", {"Apples": "apples", "oranges": "oranges", "Lemons": "lemons"})
    (wd := root/"work").mkdir()
    # 42 photos in all, fewer than --min-test-images: no evidence, not even cross-validated, could be enough
    p = fruitflow("run", "--source", src, *FAST, "--synthetic", "4", "--min-test-images", "50", workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return wd, p, runs(wd)[0]

def predict_json(wd: Path, uri: str, images: list[Path]) -> list[dict]:
    "`fruitflow predict --json` in `wd`: one dict an image."
    p = fruitflow("predict", "--json", "--model", uri, *images, workdir=wd, timeout=300)
    assert p.returncode == 0, p.stderr
    return [json.loads(l) for l in p.stdout.splitlines()]

def sample(src: Path, folders: list[str]) -> list[Path]:
    return [sorted((src/f).iterdir())[0] for f in folders]

def test_three_classes_one_vocabulary_no_synthetic_mixing_and_no_champion_on_too_few_images(three_classes):
    wd, p, run = three_classes
    assert "no synthetic photos mixed in: the generator draws apples and oranges, not apple, lemon, orange" in p.stdout, p.stdout
    assert run.data.metrics["n_synthetic"] == 0 and run.data.metrics["n_test"] == 3
    assert {"precision_apple", "recall_lemon", "f1_orange"} <= set(run.data.metrics)
    mv = mlflow_client(wd).get_model_version("fruitflow", run.data.tags["registered_version"])
    assert json.loads(mv.tags["classes"]) == ["apple", "lemon", "orange"] and mv.tags["n_test"] == "3"
    assert mv.aliases == ["challenger"], mv  # 3 test images: not a figure to crown a champion on
    why = "test accuracy {} on 3 test images: a champion needs at least 50 (--min-test-images"
    assert any(l.strip().startswith(f"registered fruitflow version {mv.version} as @challenger: ") and why.format(f"{float(mv.tags['test_accuracy']):.3f}") in l
               for l in p.stdout.splitlines()), p.stdout
    assert run.data.tags["registered_alias"] == "challenger" and "3 test images" in run.data.tags["promotion"]

def test_three_classes_predict_and_serve_answer_with_the_models_names(three_classes):
    wd, _, run = three_classes
    images = sample(wd.parent/"photos", ["Apples", "oranges", "Lemons"])
    keys = ["file", "label", "p_apple", "p_lemon", "p_orange", "model_version"]
    no_champion = one_line(fruitflow("predict", images[0], workdir=wd, timeout=300))  # the default, @champion: none yet, and the line says where to look
    assert "models:/fruitflow@champion" in no_champion and "the latest that did not is models:/fruitflow@challenger" in no_champion, no_champion
    rows = predict_json(wd, "models:/fruitflow@challenger", images)
    assert [list(r) for r in rows] == [keys] * 3 and all(r["label"] in ("apple", "lemon", "orange") for r in rows), rows
    assert all(abs(sum(r[k] for k in keys[2:-1]) - 1) < 1e-5 for r in rows) and {r["model_version"] for r in rows} == {int(run.data.tags["registered_version"])}
    url = f"http://127.0.0.1:{(port := free_port())}"
    cmd = [BIN/"fruitflow", "serve", "--model", "models:/fruitflow@challenger", "--port", port]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}  # the run's embedded store, in `wd`
    with server_process(cmd, f"{url}/health", wd/"serve.log", cwd=wd, env=env):
        for path, want in zip(images, rows):
            status, body = post(url, path.read_bytes())
            assert status == 200, body
            (got,) = json.loads(body)["predictions"]
            assert list(got)[1:] == keys[1:-1] and got["label"] == want["label"], (got, want)
            assert max(abs(got[k] - want[k]) for k in keys[2:-1]) < 1e-5, (got, want)

def test_enough_test_images_make_a_champion_and_each_model_answers_with_its_own_names(three_classes, prefect_api):
    "The same store, two classes in lower-case plural folders, the evidence checks waived: the champion on 2 test images, with p_apple and p_orange."
    wd, _, first = three_classes
    src = dataset(wd.parent/"two", {"apples": "apples", "oranges": "oranges"})
    p = fruitflow("run", "--source", src, *FAST, "--min-test-images", "0", workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = runs(wd)[0]
    c = mlflow_client(wd)
    mv = c.get_model_version_by_alias("fruitflow", "champion")
    assert mv.run_id == run.info.run_id and json.loads(mv.tags["classes"]) == ["apple", "orange"] and mv.tags["n_test"] == "2"
    assert f"registered fruitflow version {mv.version} as @champion: there is no champion yet; test accuracy" in p.stdout and "on 2 test images" in p.stdout, p.stdout
    images = sample(src, ["apples", "oranges"])
    assert [list(r) for r in predict_json(wd, "models:/fruitflow@champion", images)] == [["file", "label", "p_apple", "p_orange", "model_version"]] * 2
    assert c.get_model_version_by_alias("fruitflow", "challenger").run_id == first.info.run_id  # which answers with p_lemon too (above)
