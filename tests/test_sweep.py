"The hyperparameter sweep and the cross-validation, run for real: Prefect server, papermill kernels, MLflow store."
import contextlib, re, sqlite3, subprocess
from pathlib import Path
import numpy as np
import pytest
from conftest import fruitflow, mlflow_client, runs

TINY = ["--source", "synthetic", "--n-per-class", "6", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--width", "8", "--min-test-images", "0", "--model", "small"]  # a champion on 2 test images: these test the plumbing

def sweep(*args, workdir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    "`fruitflow sweep ...` as a user runs it."
    return fruitflow("sweep", *args, workdir=workdir, env=env)

def drawn_photos(tmp_path: Path) -> list[str]:
    "TINY with a folder of drawn photos as its source (a folder, so `--model auto` would choose efficientnet), less its --model."
    from fruitflow.download import _synthetic
    photos = _synthetic(tmp_path/"photos", 6, seed=0)
    return [str(photos) if a == "synthetic" else a for a in TINY[:-2]]

def test_sweep_runs_two_trials_in_parallel_and_registers_the_better(tmp_path, prefect_api):
    """Drawn photos in a folder, `--model auto`: on fewer than FEW training images efficientnet's head would ignore the swept
    options, so the sweep trains the small CNN and says so; its two trials run at once and the better is registered."""
    p = sweep(*drawn_photos(tmp_path), "--model", "auto", "--learning-rate", "0.003", "--augment", "0", "0.5", "--synthetic", "4", "--workers", "2", "--min-accuracy", "0",
              workdir=tmp_path, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "model: small (auto: efficientnet's head on" in p.stdout, p.stdout
    all_runs = runs(tmp_path)
    (parent,) = [r for r in all_runs if r.data.tags.get("sweep") == "true"]
    trials = sorted((r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), key=lambda r: int(r.data.tags["trial"]))
    assert len(all_runs) == 3 and len(trials) == 2
    assert parent.info.status == "FINISHED" and all(t.info.status == "FINISHED" for t in trials)
    assert [t.data.params["augment"] for t in trials] == ["0.0", "0.5"] and all(t.data.params["epochs"] == "1" for t in trials)
    assert parent.data.params["model_kind"] == "small" and all(t.data.params["model_kind"] == "small" for t in trials)
    assert all({"test_accuracy", "val_accuracy", "val_loss"} <= set(t.data.metrics) for t in trials)
    assert all(t.data.params["synthetic"] == "4" and t.data.metrics["n_synthetic"] == 8 for t in trials)  # the space's value, not run's default 40
    # in parallel: each trial started before the other ended
    assert max(t.info.start_time for t in trials) < min(t.info.end_time for t in trials)
    # the better one on validation (accuracy, then loss) is registered, through the promotion rules
    win = max(trials, key=lambda t: (t.data.metrics["val_accuracy"], -t.data.metrics["val_loss"], -int(t.data.tags["trial"])))
    assert parent.data.tags["best_run_id"] == win.info.run_id
    mv = mlflow_client(tmp_path).get_model_version("fruitflow", parent.data.tags["registered_version"])
    assert mv.tags["run_id"] == win.info.run_id and mv.aliases == ["champion"], mv
    assert parent.data.metrics["best_test_accuracy"] == win.data.metrics["test_accuracy"]
    assert f"registered fruitflow version {mv.version} as @champion" in p.stdout, p.stdout
    assert {t.data.tags["process_id"] for t in trials} == {parent.data.tags["process_id"]}  # threads: in the sweep's own process
    logs = sorted(tmp_path.glob("runs/*/trial-*/kernels.log"))
    assert len(logs) == 2
    for log in logs:  # a trial's train and evaluate ran in one kernel
        text = log.read_text()
        found = [re.search(rf"step '{s}' ran in the kernel the steps share, pid (\d+)", text) for s in ("train", "evaluate")]
        assert all(found) and len({m[1] for m in found}) == 1, text

@pytest.mark.long
def test_sweep_runs_its_trials_in_dask_worker_processes(tmp_path):
    """`--task-runner prefect_dask.DaskTaskRunner`: a local Dask cluster of two one-thread worker processes runs the trials.
    No Prefect server is given: the sweep starts Prefect's temporary server in the work folder's `prefect_home`, and the workers report to it."""
    (home := tmp_path/"home").mkdir()
    p = sweep(*TINY, "--learning-rate", "0.003", "--augment", "0", "0.5", "--workers", "2", "--min-accuracy", "0",
              "--task-runner", "prefect_dask.DaskTaskRunner", workdir=tmp_path, env={"HOME": str(home), "FRUITFLOW_CACHE": str(tmp_path/"cache")})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(tmp_path/"prefect_home"/"prefect.db")) as db:  # one server, in the work folder: the flow and every task, trials included
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 1
        names = sorted(n for (n,) in db.execute("select name from task_run"))
        assert len(names) == 4 and names[0].startswith("download") and names[1:] == ["preprocess-32", "trial-01", "trial-02"], names
    assert not (home/".prefect").exists()  # nothing in the user's own Prefect home (the sweep once read its settings before setting PREFECT_HOME)
    all_runs = runs(tmp_path)
    (parent,) = [r for r in all_runs if r.data.tags.get("sweep") == "true"]
    trials = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["task_runner"] == "prefect_dask.DaskTaskRunner" and parent.info.status == "FINISHED"
    assert len(trials) == 2 and all(t.info.status == "FINISHED" and "test_accuracy" in t.data.metrics for t in trials)
    # each trial in a worker process of its own, neither of them the sweep's, at the same time
    assert len({t.data.tags["process_id"] for t in trials} | {parent.data.tags["process_id"]}) == 3, [t.data.tags for t in trials]
    assert max(t.info.start_time for t in trials) < min(t.info.end_time for t in trials)
    # the results came back from the workers: the best is registered and printed
    mv = mlflow_client(tmp_path).get_model_version("fruitflow", parent.data.tags["registered_version"])
    assert mv.tags["run_id"] == parent.data.tags["best_run_id"] in {t.info.run_id for t in trials}
    assert f"registered fruitflow version {mv.version} as @champion" in p.stdout and "[trial-02] done" in p.stdout, p.stdout

def test_sweep_of_efficientnet_on_a_tiny_split_is_refused(tmp_path, prefect_api):
    """On fewer than FEW training images efficientnet's head is a logistic regression that ignores the swept options, and has no val figures:
    `--model efficientnet` fails in one line, with its parent run FAILED and no trials (`--model auto` sweeps the small CNN: the test above)."""
    (tmp_path/"a").mkdir()
    a = sweep(*drawn_photos(tmp_path), "--model", "efficientnet", workdir=tmp_path/"a", env={"PREFECT_API_URL": prefect_api})
    assert a.returncode == 1 and a.stderr.count("\n") == 1 and "fewer than 100" in a.stderr and "--model small" in a.stderr, a.stderr[-3000:]
    (parent,) = runs(tmp_path/"a")
    assert parent.data.tags["sweep"] == "true" and parent.info.status == "FAILED" and "fewer than 100" in parent.data.tags["error"]

@pytest.mark.quick
def test_sweep_refuses_an_unknown_task_runner_in_one_line(tmp_path):
    p = sweep(*TINY, "--task-runner", "prefect_nosuch.DaskTaskRunner", workdir=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--task-runner" in p.stderr and "pip install prefect-nosuch" in p.stderr
    assert [p.name for p in tmp_path.iterdir()] in ([], ["prefect_home"])  # nothing started: at most the home folder importing Prefect makes

@pytest.mark.quick
def test_crossval_gives_k_accuracies_per_seed(tmp_path):
    from mlflow import MlflowClient
    from fruitflow.download import _synthetic, write_manifest
    from fruitflow.preprocess import preprocess
    from fruitflow.crossval import crossval
    write_manifest(_synthetic(tmp_path/"images", 6, seed=0), tmp_path/"m.csv")
    preprocess(tmp_path/"m.csv", tmp_path/"split", image_size=24, seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    rid = c.create_run(c.create_experiment("cv")).info.run_id
    out = crossval(tmp_path/"split", tmp_path/"cv", k=3, repeats=2, epochs=1, batch_size=4, width=8, run_id=rid, tracking_uri=uri)
    assert len(out["accuracies"]) == 6 and len(out["seed_means"]) == 2 and out["seeds"] == [42, 43]
    assert all(0 <= a <= 1 for a in out["accuracies"])
    assert np.isclose(out["accuracy_mean"], np.mean(out["accuracies"])) and np.isclose(out["accuracy_std"], np.std(out["accuracies"]))
    hist = c.get_metric_history(rid, "cv_accuracy")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == list(range(6))
    assert c.get_run(rid).data.metrics["cv_accuracy_std"] == out["accuracy_std"]
