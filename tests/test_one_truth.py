"""One pipeline, one truth: each run option is declared once (`fruitflow.config.Config`), and a run looks the same
in Prefect and MLflow whichever way it was started (CLI, `pipeline(...)` from Python, a deployment's worker, a sweep).

Real components: `fruitflow up`'s Prefect and MLflow servers, `fruitflow worker`, papermill kernels, Prefect's CLI to
start the deployment's flow run; HOME is an empty folder, so that anything written under `~/.prefect` shows.
"""
from __future__ import annotations
import json, os, subprocess, sys, time, urllib.request
from pathlib import Path
import nbformat, pytest
from conftest import BIN, fruitflow, free_port
from test_deploy import TINY, api, clean_env, start_run, wait_final

STEPS = ("download", "preprocess", "train", "evaluate", "register")

@pytest.mark.quick
def test_each_option_is_declared_once():
    "The CLI's options, the flow's parameter schema, the sweep's options and the step notebooks' parameters all come from `Config`."
    import papermill as pm
    from fruitflow.cli import parser
    from fruitflow.config import SWEPT, Config, flag, nbs_dir, NOTEBOOKS
    from fruitflow.flow import pipeline
    from fruitflow.sweep import Space
    defaults = Config(workdir=".").model_dump(mode="json")
    sub = next(a for a in parser()._actions if a.dest == "command").choices
    run = {a.dest: a for a in sub["run"]._actions if a.dest != "help"}
    assert set(run) == set(Config.model_fields) and all(run[k].option_strings == [flag(k)] for k in run)
    assert all(run[k].default == f.default and run[k].help.startswith(f.description) for k, f in Config.model_fields.items())
    form = pipeline.parameters.properties  # what Prefect validates and a deployment's form shows
    assert list(form) == list(Config.model_fields)
    assert all(form[k].get("default") == f.default and form[k]["description"] == f.description for k, f in Config.model_fields.items()), form
    sweep = {a.dest: a for a in sub["sweep"]._actions}
    assert all(sweep[k].default == list(getattr(Space(), k)) and sweep[k].help.startswith(Config.model_fields[k].description) for k in SWEPT)
    taken = set()
    for s in STEPS:  # every run option a notebook declares has Config's default there; what it takes is read from that cell
        declared = pm.inspect_notebook(str(nbs_dir()/NOTEBOOKS[s]))
        for k in set(declared) & set(Config.model_fields):
            assert json.loads(declared[k]["default"].replace("_", "")) == defaults[k], (s, k, declared[k]["default"], defaults[k])
        taken |= set(declared)
    unused = set(Config.model_fields) - taken - {"experiment", "workdir", "step_timeout", "kernel_per_step", "resume", "from_step", "only"}
    assert not unused, unused  # the options no notebook takes are the run's own (where, how long, which steps)

def test_each_step_notebook_got_exactly_what_it_declares(synthetic_run):
    "The parameters papermill injected into each executed notebook of a run are exactly those its `parameters` cell declares."
    import papermill as pm
    from fruitflow.config import NOTEBOOKS, nbs_dir
    wd, proc, run = synthetic_run
    run_dir = Path(run.data.tags["run_dir"])
    for s in STEPS:
        got = nbformat.read(run_dir/NOTEBOOKS[s], as_version=4).metadata.papermill.parameters
        assert set(got) == set(pm.inspect_notebook(str(nbs_dir()/NOTEBOOKS[s]))), (s, sorted(got))

TINY_OPTIONS = dict(source="synthetic", epochs=1, image_size=32, batch_size=4, n_per_class=8, model_kind="small", min_test_images=0)

@pytest.mark.long
def test_a_run_is_the_same_run_whichever_way_it_starts(tmp_path):
    """Against one `fruitflow up`: `fruitflow run`, `pipeline(...)` from Python, a deployment run by `fruitflow worker` and a
    one-trial `fruitflow sweep` all appear in its Prefect and MLflow, the three pipeline runs with the same parameter keys, tags,
    dataset inputs and source; nothing is written under ~/.prefect."""
    from mlflow import MlflowClient
    from fruitflow.config import flag
    home, wd = tmp_path/"home", tmp_path/"work"
    home.mkdir(); wd.mkdir()
    env = {"HOME": str(home)}
    pp, mp = free_port(), free_port()
    up = fruitflow("up", "--prefect-port", pp, "--mlflow-port", mp, "--no-warm-kernel", workdir=wd, env=env, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    prefect, mlflow = f"http://127.0.0.1:{pp}/api", f"http://127.0.0.1:{mp}"
    worker = None
    try:
        cli = fruitflow("run", *(a for k, v in TINY_OPTIONS.items() for a in (flag(k), str(v))), workdir=wd, env=env)
        assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
        code = f"from fruitflow.flow import pipeline; print('VERSION', pipeline(**{TINY_OPTIONS!r})['version'])"
        py = subprocess.run([sys.executable, "-c", code], cwd=wd, env=clean_env(**env), capture_output=True, text=True, timeout=900)
        assert py.returncode == 0 and "VERSION 2" in py.stdout, py.stdout[-3000:] + py.stderr[-3000:]
        assert "[3/5] train done" in py.stdout and "| INFO" not in py.stdout + py.stderr, py.stdout[-3000:]  # each line once, as from the CLI
        dep = fruitflow("deploy", workdir=wd, env=env, timeout=300)
        assert dep.returncode == 0, dep.stdout + dep.stderr
        log = open(tmp_path/"worker.log", "w")
        worker = subprocess.Popen([BIN/"fruitflow", "worker"], cwd=wd, stdout=log, stderr=subprocess.STDOUT,
                                  env=clean_env(**env, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2"))
        fr = wait_final(prefect, start_run(prefect, *TINY), worker)
        assert fr["state"]["type"] == "COMPLETED", (fr["state"], (tmp_path/"worker.log").read_text()[-4000:])
        sw = fruitflow("sweep", "--learning-rate", "0.001", "--augment", "1", "--epochs", "1", "--image-size", "32", "--source", "synthetic",
                       "--n-per-class", "8", "--batch-size", "4", "--model", "small", "--min-test-images", "0", workdir=wd, env=env)
        assert sw.returncode == 0, sw.stdout[-3000:] + sw.stderr[-3000:]

        flows = {f["id"]: f["name"] for f in api(prefect, "/flows/filter", {})}
        frs = api(prefect, "/flow_runs/filter", {})
        assert sorted(flows[f["flow_id"]] for f in frs) == ["fruitflow"] * 3 + ["fruitflow-sweep"], [(flows[f["flow_id"]], f["name"]) for f in frs]
        assert all(f["state"]["type"] == "COMPLETED" for f in frs), [f["state"] for f in frs]
        c = MlflowClient(mlflow)
        exp = c.get_experiment_by_name("fruitflow")
        rs = c.search_runs([exp.experiment_id], order_by=["start_time ASC"])
        pipes = [r for r in rs if "sweep" not in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
        assert len(pipes) == 3 and {r.data.tags["prefect.flow_run_id"] for r in pipes} <= {f["id"] for f in frs}, [r.data.tags for r in rs]
        keys = lambda d: sorted(k for k in d if k not in ("mlflow.runName", "mlflow.log-model.history"))
        first = pipes[0]
        for r in pipes:
            assert r.info.status == "FINISHED"
            assert sorted(r.data.params) == sorted(first.data.params) and {k: r.data.params[k] for k in TINY_OPTIONS if k in r.data.params} == \
                   {k: first.data.params[k] for k in TINY_OPTIONS if k in first.data.params}, (r.data.params, first.data.params)
            assert keys(r.data.tags) == keys(first.data.tags), set(r.data.tags) ^ set(first.data.tags)
            assert r.data.tags["mlflow.source.name"] == first.data.tags["mlflow.source.name"]
            assert sorted(i.dataset.name for i in r.inputs.dataset_inputs) == sorted(i.dataset.name for i in first.inputs.dataset_inputs)
            assert len(r.inputs.dataset_inputs) == 3
        trials = [r for r in rs if "mlflow.parentRunId" in r.data.tags]
        assert len(trials) == 1 and trials[0].info.status == "FINISHED"
        assert set(trials[0].data.params) <= set(first.data.params) and {"learning_rate", "width", "augment", "model_kind"} <= set(trials[0].data.params)
        assert not (home/".prefect").exists(), sorted(p.name for p in (home/".prefect").iterdir())
    finally:
        if worker:
            worker.terminate()
            try: worker.wait(30)
            except subprocess.TimeoutExpired: worker.kill()
        fruitflow("down", workdir=wd, env=env, timeout=120)
