"""`fruitflow deploy` + `fruitflow worker`: flow runs started through Prefect's API run the pipeline on a real worker.

A real Prefect server (the session's `prefect_api`), `fruitflow deploy` as a user runs it, a `fruitflow worker`
subprocess in a work folder, and flow runs created with Prefect's own `prefect deployment run`. The MLflow
store is the embedded one of the worker's folder, so what the flow run leaves is read from there.
"""
from __future__ import annotations
import json, os, re, subprocess, time, urllib.request
from pathlib import Path
import pytest
from conftest import BIN, fruitflow, runs

TINY = ["-p", "source=synthetic", "-p", "epochs=1", "-p", "image_size=32", "-p", "batch_size=4", "-p", "n_per_class=8", "-p", "model_kind=small", "-p", "min_test_images=0"]  # plumbing: the small CNN, a champion on a tiny test split

def clean_env(**extra) -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "FRUITFLOW_WORKDIR"))} | extra

def api(url: str, path: str, body: dict|None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read())

def start_run(prefect_api: str, *params: str) -> str:
    "Create a flow run of fruitflow/fruitflow with Prefect's CLI, as a user would; its id."
    p = subprocess.run([BIN/"prefect", "deployment", "run", "fruitflow/fruitflow", *params], env=clean_env(PREFECT_API_URL=prefect_api),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", p.stdout).group(1)

def wait_final(prefect_api: str, run_id: str, worker: subprocess.Popen, timeout: float = 900) -> dict:
    "The flow run once its state is final."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fr = api(prefect_api, f"/flow_runs/{run_id}")
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"): return fr
        assert worker.poll() is None, "the worker exited"
        time.sleep(2)
    pytest.fail(f"flow run {run_id} still {fr['state']['type']} after {timeout} s")

@pytest.fixture
def deployed(tmp_path, prefect_api):
    "`fruitflow deploy` run twice (it is idempotent) and a `fruitflow worker` in a work folder: (workdir, worker, deploy outputs)."
    wd = tmp_path/"work"; wd.mkdir()
    env = {"PREFECT_API_URL": prefect_api}
    first, again = (fruitflow("deploy", workdir=tmp_path, env=env, timeout=300) for _ in range(2))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    log = open(tmp_path/"worker.log", "w")
    worker = subprocess.Popen([BIN/"fruitflow", "worker", "--name", "test-worker"], cwd=wd, stdout=log, stderr=subprocess.STDOUT,
                              env=clean_env(PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2"))
    yield wd, worker, (first.stdout, again.stdout)
    worker.terminate()
    try: worker.wait(30)
    except subprocess.TimeoutExpired: worker.kill()
    log.close()
    print((tmp_path/"worker.log").read_text()[-5000:])

@pytest.mark.long
def test_deploy_and_worker_run_the_pipeline(deployed, prefect_api, tmp_path):
    wd, worker, (first, again) = deployed
    ids = [re.search(r"deployment fruitflow/fruitflow: ([0-9a-f-]{36})", o).group(1) for o in (first, again)]
    assert ids[0] == ids[1] and "work pool fruitflow: exists" in again, (first, again)  # deploying again updates the same deployment
    dep = api(prefect_api, "/deployments/name/fruitflow/fruitflow")
    assert dep["work_pool_name"] == "fruitflow" and dep["entrypoint"] == "fruitflow.flow.pipeline", dep
    form = dep["parameter_openapi_schema"]["properties"]  # what the UI draws as the run's form
    assert form["epochs"]["default"] == 10 and form["model_kind"]["enum"] == ["auto", "small", "lab", "efficientnet"] and "source" in form, form

    good, bad = start_run(prefect_api, *TINY), start_run(prefect_api, "-p", "epochs=0", "-p", "source=synthetic")
    lost = start_run(prefect_api, *TINY, "-p", "tracking_uri=http://127.0.0.1:9")  # no MLflow server there
    fb, fl = wait_final(prefect_api, bad, worker, 600), wait_final(prefect_api, lost, worker, 600)
    assert fb["state"]["type"] == "FAILED", fb["state"]
    assert "--epochs: Input should be greater than or equal to 1" in fb["state"]["message"] and "Traceback" not in fb["state"]["message"], fb["state"]["message"]
    assert fl["state"]["type"] == "FAILED" and "the MLflow server at http://127.0.0.1:9 is unreachable" in fl["state"]["message"], fl["state"]
    fg = wait_final(prefect_api, good, worker)
    assert fg["state"]["type"] == "COMPLETED", (fg["state"], (tmp_path/"worker.log").read_text()[-4000:])

    rs = runs(wd)  # the worker's folder holds the embedded MLflow store: the bad run opened no MLflow run
    assert len(rs) == 1, [r.info.run_id for r in rs]
    r = rs[0]
    assert r.info.status == "FINISHED" and r.data.tags["prefect.flow_run_id"] == good, (r.info.status, r.data.tags)
    assert r.data.tags.get("registered_version") == "1", r.data.tags
    run_dir = Path(r.data.tags["run_dir"])
    assert run_dir.parent == wd.resolve()/"runs", run_dir  # in the worker's folder, not Prefect's temporary one
    assert sorted(p.name for p in run_dir.glob("0*.ipynb")) == ["01_download.ipynb", "02_preprocess.ipynb", "03_train.ipynb", "04_evaluate.ipynb", "05_register.ipynb"]

    st = fruitflow("status", workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert "deployment fruitflow/fruitflow" in st.stdout and re.search(r"worker +test-worker +pool fruitflow +ONLINE", st.stdout), st.stdout

@pytest.mark.quick
def test_commands_without_a_server_say_so_in_one_line(tmp_path):
    for cmd in ("deploy", "worker"):
        p = fruitflow(cmd, workdir=tmp_path, env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}, timeout=120)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"fruitflow {cmd}: the Prefect server at http://127.0.0.1:9/api is unreachable" in p.stderr, p.stderr

def test_deploy_on_a_schedule(prefect_api, tmp_path):
    "`--cron` gives the deployment Prefect's cron schedule, which `fruitflow status` shows (1 January: it never comes due during a test)."
    env = {"PREFECT_API_URL": prefect_api}
    p = fruitflow("deploy", "--name", "yearly", "--pool", "fruitflow-yearly", "--cron", "0 0 1 1 *", workdir=tmp_path, env=env, timeout=300)
    assert p.returncode == 0 and "(schedule 0 0 1 1 *)" in p.stdout, p.stdout + p.stderr
    dep = api(prefect_api, "/deployments/name/fruitflow/yearly")
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 0 1 1 *"] and dep["work_pool_name"] == "fruitflow-yearly", dep["schedules"]
    st = fruitflow("status", workdir=tmp_path, env=env)
    assert re.search(r"deployment fruitflow/yearly +pool fruitflow-yearly +0 0 1 1 \*", st.stdout), st.stdout
