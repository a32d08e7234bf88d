"The whole pipeline, run for real: Prefect server, papermill kernels, MLflow store, HTTP downloads."
import base64, contextlib, json, os, re, sqlite3, urllib.parse, urllib.request
import nbformat
from pathlib import Path
import pytest
from conftest import BIN, FAST, LAB_IMAGES, free_port, fruitflow, mlflow_client, runs, server_process
from test_deploy import clean_env

STEPS = ["01_download", "02_preprocess", "03_train", "04_evaluate", "05_register"]

def _artifacts(client, run_id, path=""):
    out = []
    for a in client.list_artifacts(run_id, path): out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out

def check_complete_run(wd: Path, run, epochs: int):
    "Everything one pipeline execution must leave in MLflow."
    c = mlflow_client(wd)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == str(epochs) and run.data.params["batch_size"] == "4"
    assert run.data.params["synthetic"] == "40" and run.data.metrics["n_synthetic"] == 80  # apples and oranges: 40 synthetic photos each mixed in
    assert {"width", "augment", "learning_rate", "patience"} <= set(run.data.params) and "head_steps" not in run.data.params  # the CNN's own
    for k in run.data.metrics:  # each metric once a step, and no copy of another (Keras autologging's validation_* of val_*)
        steps = [m.step for m in c.get_metric_history(run.info.run_id, k)]
        assert not k.startswith("validation_") and len(steps) == len(set(steps)), (k, steps)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")] == list(range(epochs))  # each epoch's at its step
    assert run.data.tags["mlflow.source.name"].startswith("fruitflow.flow.pipeline") and run.data.tags["mlflow.source.type"] == "JOB"
    inputs = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}  # a dataset a split
    assert set(inputs) == {"train", "val", "test"} and all(d.digest and d.name for d in inputs.values()), inputs
    assert len(c.get_metric_history(run.info.run_id, "loss")) == epochs  # autologged per epoch
    assert {"test_loss", "test_accuracy", "f1_apple", "recall_orange"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    arts = _artifacts(c, run.info.run_id)
    assert "weights/model.weights.h5" in arts and "evaluation/confusion_matrix.png" in arts
    assert [f"notebooks/{s}.ipynb" for s in STEPS] == sorted(a for a in arts if a.startswith("notebooks/"))
    mv = c.get_model_version("fruitflow", run.data.tags["registered_version"])
    assert mv.tags["run_id"] == run.info.run_id and mv.aliases, mv
    assert run.data.params["precision"] in ("float32", "bfloat16")  # as train resolved "auto" on this machine
    code = Path(urllib.parse.urlparse(c.get_logged_model(mv.source.removeprefix("models:/")).artifact_location).path)/"code"/"fruitflow"
    assert sorted(p.name for p in code.iterdir()) == ["__init__.py", "core.py", "predict.py"]  # the code the model loads, not the whole package
    assert (code.parent.parent/"fruit_model.py").is_file() and not list(code.parent.parent.rglob("*.pkl"))  # models-from-code: nothing pickled
    run_dir = Path(run.data.tags["run_dir"])
    assert all((run_dir/f"{s}.ipynb").exists() for s in STEPS)
    log = (run_dir/"kernels.log").read_text()  # every step ran in the kernel started ahead and shared (the default): this log says which kernel ran each step
    pids = {re.search(rf"step '{s[3:]}' ran in the kernel the steps share, pid (\d+)", log)[1] for s in STEPS}
    assert len(pids) == 1, log[-3000:]
    for s in STEPS:  # each notebook numbered from 1, as in a kernel of its own
        assert next(c for c in nbformat.read(run_dir/f"{s}.ipynb", as_version=4).cells if c.cell_type == "code").execution_count == 1, s
    assert not list(wd.glob(".kernels-*.log"))

def test_synthetic_run(synthetic_run):
    wd, proc, run = synthetic_run
    check_complete_run(wd, run, epochs=1)
    assert len(runs(wd)) == 1  # exactly one MLflow run per pipeline execution
    assert run.data.tags["data_source"] == "synthetic"
    assert run.data.params["model_kind"] == "small"  # --model auto: the small CNN on drawn photos (EfficientNet-Lite0 does not carry over from them)
    out = proc.stdout
    assert all(f"[{i}/5] {s[3:]} done in" in out for i, s in enumerate(STEPS, 1)), out
    assert f"MLflow run {run.info.run_id}: test accuracy" in out

@pytest.mark.long
def test_cold_runs_start_prefect_from_a_kept_database(tmp_path):
    """Two runs on the embedded defaults, no server: each starts Prefect's temporary server on a fresh home. The first
    one's database, once migrated, is kept in fruitflow's cache before the flow writes to it; the second home starts from a copy."""
    cache = tmp_path/"cache"
    for name in ("first", "second"):
        (wd := tmp_path/name).mkdir()
        p = fruitflow("run", "--source", "synthetic", "--n-per-class", "6", *FAST, workdir=wd, env={"FRUITFLOW_CACHE": str(cache)})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        (run,) = runs(wd)
        check_complete_run(wd, run, epochs=1)
        assert run.data.tags["prefect.flow_run_id"]
        assert ("kept Prefect's migrated, empty database in" in p.stdout) == (name == "first"), p.stdout  # said once, when kept
        (drawn,) = (cache/"synthetic").iterdir()  # the synthetic photos train mixes in, kept for any work folder: no part file left
        if name == "first": drawn_at = drawn.stat().st_mtime_ns
    assert drawn.stat().st_mtime_ns == drawn_at  # the second work folder read them back
    (template,) = cache.glob("prefect-*.db")
    assert sorted(cache.iterdir()) == sorted([template, cache/"synthetic"])  # no part file left, and no copy of MLflow's store
    def contents(db: Path) -> tuple[set, int]:
        with contextlib.closing(sqlite3.connect(db)) as c:
            return {i for (i,) in c.execute("select id from block_schema")}, c.execute("select count(*) from flow_run").fetchone()[0]
    (kept, n_kept), (first, n_first), (second, n_second) = (contents(d) for d in (template, tmp_path/"first/prefect_home/prefect.db", tmp_path/"second/prefect_home/prefect.db"))
    assert kept and n_kept == 0  # Prefect's block types, no run
    assert first == kept == second  # ids a fresh database draws at random: the second home's came from the copy
    assert n_first == n_second == 1  # each home holds its own run
    with contextlib.closing(sqlite3.connect(tmp_path/"second/prefect_home/prefect.db")) as c:  # the run's record reached the server before it stopped
        assert c.execute("select state_type from flow_run").fetchall() == [("COMPLETED",)]
        assert c.execute("select count(*) from task_run where state_type = 'COMPLETED'").fetchone()[0] == 5
        assert c.execute("select count(*) from log").fetchone()[0] > 0  # Prefect's log worker flushed before the server stopped
    assert (tmp_path/"second/prefect_home/temporary-server.log").read_text().startswith("--- ")  # the server's messages, off the console

def test_a_temporary_server_that_cannot_start_is_one_line(tmp_path):
    "Prefect's temporary server fails to start (its database cannot be opened): one line says why and where its messages are; no run is opened."
    (tmp_path/"a-file").write_text("")
    p = fruitflow("run", "--source", "synthetic", "--n-per-class", "6", *FAST, workdir=tmp_path,
                  env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/a-file/prefect.db"})  # a folder that cannot be
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stdout[-3000:] + p.stderr[-3000:]
    log = tmp_path/"prefect_home"/"temporary-server.log"
    assert "Prefect's temporary server exited with code 3 before it answered: " in p.stderr and "unable to open database file" in p.stderr, p.stderr
    assert str(log) in p.stderr and "Traceback" in log.read_text() and "Traceback" not in p.stderr + p.stdout
    assert not runs(tmp_path)  # nothing RUNNING, nothing at all

def test_lab_images_over_http(tmp_path, prefect_api, lab_site):
    p = fruitflow("run", "--source", "github", "--base-url", lab_site, *FAST, workdir=tmp_path, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = runs(tmp_path)
    check_complete_run(tmp_path, run, epochs=1)
    assert run.data.tags["data_source"] == "github"
    assert run.data.metrics["n_images"] == 19  # the lab's copy lacks apple-5: skipped on a 404, not an error
    assert any(l.strip().startswith("skipped") and "apple-5.jpeg" in l and "404" in l for l in p.stdout.splitlines()), p.stdout
    fetched = sorted(Path(tmp_path, "data/github").glob("*/*.jpeg"))
    assert len(fetched) == 19 and not list(Path(tmp_path, "data").rglob("*.part"))

def test_failing_step_leaves_run_failed(tmp_path, prefect_api):
    "A class folder without one usable image: preprocess fails, the run is FAILED, the notebook is kept."
    src = tmp_path/"photos"
    for c in ("apple", "orange"): (src/c).mkdir(parents=True)
    from fruitflow.download import draw
    for i in range(4): draw("apple", i, 48).save(src/"apple"/f"{i}.png")
    (src/"orange"/"orange.jpg").write_text("<html>not a photo</html>")
    wd = tmp_path/"work"; wd.mkdir()
    p = fruitflow("run", "--source", src, *FAST, workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "step 'preprocess' failed" in err[0] and "class 'orange'" in err[0], p.stderr
    assert "Traceback" not in p.stderr
    (run,) = runs(wd)
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == "preprocess"
    with urllib.request.urlopen(f"{prefect_api}/flow_runs/{run.data.tags['prefect.flow_run_id']}", timeout=30) as r:
        assert json.load(r)["state"]["type"] == "FAILED"  # the Prefect flow run too
    kept = Path(err[0].rsplit("executed notebook: ", 1)[1].rstrip(")"))
    assert kept.exists() and "DataError" in kept.read_text()
    assert "notebooks/02_preprocess.ipynb" in _artifacts(mlflow_client(wd), run.info.run_id)

@pytest.mark.quick
@pytest.mark.parametrize("args, says", [(["--epochs", "0"], "--epochs"), (["--source", "/no/such/place"], "--source"),
                                        (["--batch-size", "many"], "--batch-size"), (["--model", "huge"], "--model"),
                                        (["--source", LAB_IMAGES.parent], f"--source: '{LAB_IMAGES.parent}' holds data sets, not class folders: "
                                                                         f"name one of them, e.g. --source {LAB_IMAGES}"),  # one level too high
                                        (["--epoch", "3"], "unrecognized arguments: --epoch 3")])  # no abbreviation of --epochs
def test_bad_option_is_one_line_and_starts_nothing(tmp_path, args, says):
    p = fruitflow("run", *args, workdir=tmp_path, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    assert not (tmp_path/"runs").exists() and not (tmp_path/"mlflow.db").exists()

@pytest.mark.long
def test_efficientnet_trains_offline_from_the_package_weights(tmp_path, prefect_api):
    "Transfer learning, offline: EfficientNet-Lite0 with the ImageNet weights of an installed package, a full run that registers it."
    p = fruitflow("run", *FAST, "--model", "efficientnet", "--source", "synthetic", "--n-per-class", "6", workdir=tmp_path, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["model_kind"] == "efficientnet" and run.data.tags["registered_version"] == "1"
    p = run.data.params  # a tiny split: the head's own parameters, and no CNN's
    assert (p["head_steps"], p["head_learning_rate"], p["head_l2"]) == ("300", "0.01", "0.001") and not {"width", "augment", "synthetic"} & set(p), p
    assert p["batch_size"] == str(int(run.data.metrics["n_train"] + run.data.metrics["n_val"])) and "best_epoch" not in run.data.metrics  # full batches
    assert run.data.metrics["n_synthetic"] == 0 and run.data.metrics["n_params"] > 3_000_000  # drawn photos not mixed in; the backbone is in the model
    assert run.data.params["precision"] == "float32"  # "auto": its frozen backbone gains nothing from bfloat16
    assert {"loss", "accuracy"} <= set(run.data.metrics), sorted(run.data.metrics)  # autologging recorded the head's epochs
    executed = (Path(run.data.tags["run_dir"])/"03_train.ipynb").read_text()
    assert "a logistic regression on" in executed and "during keras autologging" not in executed, executed[-3000:]

    # MLflow's own scoring server loads the models-from-code pyfunc in this environment and answers as fruitflow's predict does
    import mlflow, pandas as pd
    photos = [LAB_IMAGES/"apples"/"apple-1.jpeg", LAB_IMAGES/"oranges"/"orange-1.jpeg"]
    store, port = f"sqlite:///{tmp_path}/mlflow.db", free_port()
    env = clean_env(MLFLOW_TRACKING_URI=store, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")  # PATH as in an activated venv: it runs `uvicorn`
    with server_process([BIN/"mlflow", "models", "serve", "-m", "models:/fruitflow/1", "--env-manager", "local", "-h", "127.0.0.1", "-p", port],
                        f"http://127.0.0.1:{port}/ping", tmp_path/"mlflow-serve.log", cwd=tmp_path, env=env):
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()] for p in photos]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r: served = json.loads(r.read())["predictions"]
    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(store); mlflow.set_registry_uri(store)
    try: here = mlflow.pyfunc.load_model("models:/fruitflow/1").predict(pd.DataFrame({"image": [p.read_bytes() for p in photos]}))
    finally: mlflow.set_tracking_uri(old[0]); mlflow.set_registry_uri(old[1])
    assert len(served) == 2 and set(served[0]) == {"label", "p_apple", "p_orange"}, served
    for r, (_, row) in zip(served, here.iterrows()):
        assert r["label"] == row["label"] and all(abs(r[c] - row[c]) < 1e-5 for c in ("p_apple", "p_orange")), (served, here)

@pytest.mark.long
def test_quick_start_then_predict_then_the_labs_photos_then_a_model_at_chance(tmp_path, prefect_api):
    """The learner's first hour, offline: `fruitflow run` on the embedded defaults ends with a champion (judged on freshly
    drawn photos) and the next step; that very `fruitflow predict` command answers and names the version; then the lab's
    19 photos (2 test images) make a champion on their cross-validated accuracy, which predict answers with by default; a model
    at chance (two classes of the same kind of photo) does not replace it."""
    env = {"PREFECT_API_URL": prefect_api}
    first = fruitflow("run", workdir=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "registered fruitflow version 1 as @champion: there is no champion yet; accuracy on freshly drawn photos" in first.stdout, first.stdout[-2000:]
    nxt = re.search(r"^next: fruitflow predict (\S+)   # fruitflow version 1 \(@champion\) labels a test photo$", first.stdout, re.M)
    assert nxt and (tmp_path/nxt[1]).is_file(), first.stdout[-1000:]  # a test photo, relative to where the run was started
    p = fruitflow("predict", nxt[1], workdir=tmp_path, timeout=300)
    assert p.returncode == 0 and p.stderr == "fruitflow predict: models:/fruitflow@champion is fruitflow version 1\n", p.stderr
    assert p.stdout.splitlines()[1].split()[0] == nxt[1], p.stdout
    lab = fruitflow("run", "--source", LAB_IMAGES, workdir=tmp_path, env=env)
    assert lab.returncode == 0, lab.stdout[-3000:] + lab.stderr[-3000:]
    said = re.search(r"registered fruitflow version 2 as @champion: (5-fold cross-validated accuracy ([\d.]+) on 19 images), trained on real photos", lab.stdout)
    assert said and float(said[2]) >= 0.8, lab.stdout[-2000:]  # 2 test images, but every photo predicted once by a model that did not train on it
    (run,) = [r for r in runs(tmp_path) if r.data.tags.get("registered_version") == "2"]
    assert run.data.tags["evidence"] == said[1] and run.data.metrics["promotion_images"] == 19 and run.data.metrics["n_test"] == 2
    p = fruitflow("predict", "--json", LAB_IMAGES/"apples"/"apple-1.jpeg", workdir=tmp_path, timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["model_version"] == 2 and "version 2" in p.stderr, p.stdout + p.stderr
    from fruitflow.download import draw  # a model at chance: "apples" and "oranges" that are all drawn apples
    for c, base in (("apples", 0), ("oranges", 1000)):
        (tmp_path/"chance"/c).mkdir(parents=True)
        for i in range(10): draw("apple", base + i).save(tmp_path/"chance"/c/f"{i}.jpg", quality=90)
    chance = fruitflow("run", "--source", tmp_path/"chance", workdir=tmp_path, env=env)
    assert chance.returncode == 0, chance.stdout[-3000:] + chance.stderr[-3000:]
    assert re.search(r"registered fruitflow version 3 as @challenger: 5-fold cross-validated accuracy [\d.]+ on 20 images is not clearly better "
                     r"than always giving the commonest answer \(0\.500\)", chance.stdout), chance.stdout[-2000:]
    assert int(mlflow_client(tmp_path).get_model_version_by_alias("fruitflow", "champion").version) == 2
