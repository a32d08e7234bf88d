"""`fruitflow up|status|down|screenshots`: the dashboards, for real.

`fruitflow up` starts a real Prefect server and a real MLflow server on free loopback ports in a temporary work
folder; the pipeline runs against them as a subprocess whose environment has no MLFLOW_*/PREFECT_* variable
(conftest's `fruitflow()` strips them), so it can only find the servers through `up`'s pid files. Results are
checked through the servers' REST APIs and in a real headless Chromium. Nothing is mocked.
"""
from __future__ import annotations
import json, os, re, signal, socket, struct, subprocess, sys, time, urllib.parse, urllib.request
from pathlib import Path
import pytest
from conftest import free_port, fruitflow, runs

pytestmark = pytest.mark.xdist_group("dashboards")  # its module-scoped fixtures: one worker runs the module

RUN = ["run", "--source", "synthetic", "--n-per-class", "6", "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--min-test-images", "0", "--model", "small"]  # a champion however small the test split
STEPS_IN_ORDER = ("download", "preprocess", "train", "evaluate", "register")
STEPS = set(STEPS_IN_ORDER)

def _api(url: str, body: dict|None = None):
    "GET `url`, or POST `body` as JSON; the decoded answer."
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read())

def _group(pgid: int) -> list[int]:
    "The live pids of process group `pgid`."
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try: stat = (d/"stat").read_text().rsplit(")", 1)[1].split()
            except OSError: continue
            if int(stat[2]) == pgid and stat[0] != "Z": out.append(int(d.name))
    return out

def _png_size(p: Path) -> tuple[int, int]:
    "Width and height of a PNG file (fails if it is not one)."
    b = p.read_bytes()[:24]
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR", f"{p} is not a PNG"
    return struct.unpack(">II", b[16:24])

@pytest.fixture(scope="module")
def dashboards(tmp_path_factory):
    "`fruitflow up` on free ports in a fresh work folder whose experiment was made by the embedded store: (workdir, Prefect URL, MLflow URL)."
    from mlflow import MlflowClient
    from fruitflow.config import Config
    from fruitflow.tracking import experiment_id
    wd = tmp_path_factory.mktemp("dashboards")
    uri = f"sqlite:///{wd}/mlflow.db"
    experiment_id(MlflowClient(uri), Config(workdir=wd), uri)  # as a run without servers leaves it: artifacts at file://<wd>/mlartifacts
    pp, mp = free_port(), free_port()
    p = fruitflow("up", "--prefect-port", pp, "--mlflow-port", mp, workdir=wd, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"http://127.0.0.1:{pp}" in p.stdout and f"http://127.0.0.1:{mp}" in p.stdout, p.stdout
    try: yield wd, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{mp}"
    finally: fruitflow("down", workdir=wd, timeout=120)

def _offer(wd: Path) -> dict:
    "The warm kernel the keeper offers (waiting for it)."
    f, end = wd/".fruitflow"/"warm-kernel.json", time.monotonic() + 300
    while not f.exists(): assert time.monotonic() < end, "no warm kernel on offer"; time.sleep(0.2)
    return json.loads(f.read_text())

@pytest.fixture(scope="module")
def first_run(dashboards):
    "The first pipeline run right after `up`, no variable set: (completed process, MLflow run, the warm kernel it was offered)."
    wd, prefect, mlflow = dashboards
    offer = _offer(wd)  # `up` returned once it was offered
    p = fruitflow(*RUN, workdir=wd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, runs(wd)[0], offer

def test_up_twice_and_status(dashboards):
    wd, prefect, mlflow = dashboards
    pids = {n: json.loads((wd/".fruitflow"/f"{n}.json").read_text())["pid"] for n in ("prefect", "mlflow")}
    p = fruitflow("up", "--prefect-port", prefect.rsplit(":", 1)[1], "--mlflow-port", mlflow.rsplit(":", 1)[1], workdir=wd, timeout=120)
    assert p.returncode == 0 and "prefect is already running" in p.stdout and "mlflow is already running" in p.stdout, p.stdout + p.stderr
    s = fruitflow("status", workdir=wd, timeout=60)
    assert s.returncode == 0, s.stdout + s.stderr
    for n, url in (("prefect", prefect), ("mlflow", mlflow)):
        line = next(l for l in s.stdout.splitlines() if l.startswith(n))
        assert url in line and f"pid {pids[n]}" in line and "healthy" in line and str(wd/".fruitflow"/f"{n}.log") in line, line

def test_run_uses_the_servers(dashboards, first_run):
    wd, prefect, mlflow = dashboards
    p, run, offer = first_run
    assert f"({mlflow})" in p.stdout, p.stdout  # "MLflow run <id> (<tracking uri>)": the server, found through the pid file
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    fr = _api(f"{prefect}/api/flow_runs/{flow_run_id}")
    assert fr["state_type"] == "COMPLETED" and fr["name"] == run.info.run_name, fr
    trs = _api(f"{prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"] for t in trs} == STEPS and all(t["state_type"] == "COMPLETED" for t in trs), [(t["name"], t["state_type"]) for t in trs]
    logs = _api(f"{prefect}/api/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    assert any("synthetic: 12 files" in l["message"] and l["task_run_id"] for l in logs), [l["message"] for l in logs]  # the download step's output
    assert not [l["message"] for l in logs if l["level"] >= 30], [l["message"] for l in logs if l["level"] >= 30]  # no warning: the missing limit is not asked for
    art = _api(f"{prefect}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    assert len(art) == 1 and art[0]["type"] == "markdown", art
    md = art[0]["data"]
    assert f"| test_accuracy | {run.data.metrics['test_accuracy']:.4g} |" in md and f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in md, md

def test_mlflow_run_through_the_server(dashboards, first_run):
    wd, prefect, mlflow = dashboards
    run_id = first_run[1].info.run_id
    r = _api(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    params, metrics = {p["key"]: p["value"] for p in r["data"]["params"]}, {m["key"] for m in r["data"]["metrics"]}
    assert r["info"]["status"] == "FINISHED", r["info"]
    assert params["epochs"] == "1" and params["image_size"] == "32" and params["source"] == "synthetic", params
    assert {"test_accuracy", "val_loss", "n_train", "system/cpu_utilization_percentage"} <= metrics, metrics
    files = {f["path"] for f in _api(f"{mlflow}/api/2.0/mlflow/artifacts/list?run_id={run_id}")["files"]}
    assert {"notebooks", "evaluation", "model_summary.txt"} <= files, files
    # the experiment made by the embedded store keeps its file:// artifacts; the server (and so its UI) serves them
    exp = _api(f"{mlflow}/api/2.0/mlflow/experiments/get?experiment_id={r['info']['experiment_id']}")["experiment"]
    assert exp["artifact_location"] == (wd/"mlartifacts").as_uri(), exp
    with urllib.request.urlopen(f"{mlflow}/get-artifact?path=model_summary.txt&run_uuid={run_id}", timeout=30) as f: assert b"Total params" in f.read()
    mv = _api(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=fruitflow&alias=champion")["model_version"]
    assert mv["run_id"] == run_id, mv

def test_dashboards_in_a_browser(dashboards, first_run, tmp_path):
    from fruitflow.screenshots import browser, open_page, artifact_id
    wd, prefect, mlflow = dashboards
    run = runs(wd)[0]
    name, acc, flow_run_id = run.info.run_name, run.data.metrics["test_accuracy"], run.data.tags["prefect.flow_run_id"]
    with browser() as d:
        text = open_page(d, f"{prefect}/runs", [name])  # Prefect's flow runs list
        text = open_page(d, f"{prefect}/artifacts/artifact/{artifact_id(prefect, flow_run_id)}", [name, "test_accuracy"])
        assert float(re.search(r"test_accuracy\s+([-\d.e+]+)", text)[1]) == pytest.approx(acc, abs=1e-3), text
        text = open_page(d, f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", [name, "test_accuracy"])
        assert float(re.search(r"test_accuracy\s+([-\d.e+]+)", text)[1]) == pytest.approx(acc, abs=1e-3), text
    p = fruitflow("screenshots", "--out", tmp_path/"img", workdir=wd, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    pngs = sorted((tmp_path/"img").glob("*.png"))
    assert {f.stem for f in pngs} == {"prefect-flow-runs", "prefect-flow-run-graph", "prefect-artifact", "mlflow-runs", "mlflow-metrics",
                                      "mlflow-system-metrics", "mlflow-artifacts", "mlflow-model"}, pngs
    for f in pngs:
        w, h = _png_size(f)
        assert w >= 1000 and h >= 600 and f.stat().st_size > 20_000, (f, w, h, f.stat().st_size)  # a blank page compresses to a few kB

def test_rerun_adds_a_run(dashboards, first_run):
    wd, prefect, mlflow = dashboards
    before = {r.info.run_id for r in runs(wd)}
    p = fruitflow(*RUN, workdir=wd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    after = runs(wd)
    assert len(after) == len(before) + 1 and after[0].info.run_id not in before
    flows = _api(f"{prefect}/api/flow_runs/filter", {"flow_runs": {"id": {"any_": [r.data.tags["prefect.flow_run_id"] for r in after]}}})
    assert len(flows) == len(after) and all(f["state_type"] == "COMPLETED" for f in flows)

def test_run_takes_the_warm_kernel(dashboards, first_run):
    "Every step of the first run ran in the kernel `up`'s keeper offered; the keeper offers another once the run is over; a run in another environment starts its own."
    wd = dashboards[0]
    p, run, offer = first_run
    log = (Path(run.data.tags["run_dir"])/"kernels.log").read_text()
    assert log.count(f"the kernel the steps share, pid {offer['pid']}, kept warm by `fruitflow up`") == 5, log
    assert not psutil_alive(offer["pid"])  # the run killed it at its end
    again = _offer(wd)
    assert again["pid"] != offer["pid"] and psutil_alive(again["pid"])
    s = fruitflow("status", workdir=wd, timeout=60)
    assert f"kernel   warm, pid {again['pid']}" in s.stdout, s.stdout
    other = fruitflow(*RUN, workdir=wd, env={"FRUITFLOW_TEST_OTHER_ENVIRONMENT": "1"})  # the kernel would not have this variable
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    log = (Path(runs(wd)[0].data.tags["run_dir"])/"kernels.log").read_text()
    assert log.count("the kernel the steps share, pid") == 5 and "kept warm" not in log, log
    assert _offer(wd)["pid"] == again["pid"] and psutil_alive(again["pid"])  # still on offer for a run of up's environment

def psutil_alive(pid: int) -> bool:
    "Is process `pid` running (not a zombie)?"
    import psutil
    try: return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error: return False

def _heartbeats(prefect: str, flow_run_id: str) -> int:
    "How many heartbeat events the Prefect server holds for the flow run."
    return _api(f"{prefect}/api/events/filter", {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                                                            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})["total"]

def test_heartbeats_only_when_the_user_sets_their_frequency(dashboards, first_run):
    "A flow run sends Prefect's heartbeats (its first at the flow's start) only with PREFECT_FLOWS_HEARTBEAT_FREQUENCY set: `servers.quiet_heartbeats`."
    wd, prefect, mlflow = dashboards
    p = fruitflow(*RUN, workdir=wd, env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    asked, end = runs(wd)[0].data.tags["prefect.flow_run_id"], time.monotonic() + 60
    while not _heartbeats(prefect, asked):  # the server stores events a moment after they come
        assert time.monotonic() < end, "no heartbeat event for the run that asked for them"
        time.sleep(1)
    assert _heartbeats(prefect, first_run[1].data.tags["prefect.flow_run_id"]) == 0  # sent earlier than the one above, had there been one

@pytest.mark.quick
def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen()
        busy = s.getsockname()[1]
        p = fruitflow("up", "--prefect-port", free_port(), "--mlflow-port", busy, workdir=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"port {busy}" in p.stderr and "--mlflow-port" in p.stderr, p.stderr
    assert not list(tmp_path.glob(".fruitflow/*.json"))  # nothing was started

@pytest.mark.quick
def test_stale_pid_file_is_cleaned(tmp_path):
    (tmp_path/".fruitflow").mkdir()
    (tmp_path/".fruitflow"/"mlflow.json").write_text(json.dumps({"name": "mlflow", "pid": 2**22 + 1, "start": 1, "url": "http://127.0.0.1:1", "log": "x"}))
    p = fruitflow("status", workdir=tmp_path, timeout=60)
    assert p.returncode == 1 and "mlflow   not running" in p.stdout, p.stdout
    assert not (tmp_path/".fruitflow"/"mlflow.json").exists()

@pytest.mark.quick
def test_user_variables_win(tmp_path, monkeypatch):
    "A running server's URL fills only the variables the user left unset (this process plays the server: its pid file is real)."
    import os
    from fruitflow.servers import env_defaults
    from fruitflow.servers import start_time
    (tmp_path/".fruitflow").mkdir()
    for n, port in (("prefect", 1), ("mlflow", 2)):
        (tmp_path/".fruitflow"/f"{n}.json").write_text(json.dumps({"name": n, "pid": os.getpid(), "start": start_time(os.getpid()), "url": f"http://127.0.0.1:{port}", "log": "x"}))
    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "PREFECT_"))]: monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    saved = dict(os.environ)
    try:
        env_defaults(tmp_path)
        assert (os.environ["MLFLOW_TRACKING_URI"], os.environ["PREFECT_API_URL"]) == ("sqlite:///mine.db", "http://127.0.0.1:1/api")
    finally: os.environ.clear(); os.environ.update(saved)  # env_defaults sets more than this test wants to keep

def test_down_stops_everything_it_started(dashboards):
    "`down` stops both servers, each with its whole process group, and the warm kernel's keeper with its kernel; `status` then says so."
    wd = dashboards[0]
    pgids = [json.loads((wd/".fruitflow"/f"{n}.json").read_text())["pid"] for n in ("prefect", "mlflow", "kernel")]
    kernel = _offer(wd)["pid"]
    assert all(_group(g) for g in pgids) and psutil_alive(kernel)
    p = fruitflow("down", workdir=wd, timeout=120)
    assert p.returncode == 0 and all(f"stopped {n}" in p.stdout for n in ("prefect", "mlflow", "kernel")), p.stdout + p.stderr
    assert not any(_group(g) for g in pgids), {g: _group(g) for g in pgids}
    assert not psutil_alive(kernel) and not (wd/".fruitflow"/"warm-kernel.json").exists()
    assert fruitflow("status", workdir=wd, timeout=60).returncode == 1
