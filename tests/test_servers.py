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
from conftest import BIN, free_port, fruitflow, runs, wait_for, with_handlers

RUN = ["run", "--source", "synthetic", "--n-per-class", "6", "--epochs", "1", "--image-size", "32", "--batch-size", "4"]
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

def _driver_log(wd: Path) -> str: return (wd/".fruitflow"/"driver.log").read_text()

def _served(wd: Path) -> dict[int, str]:
    "The runs the warm driver over `wd` forked: pid → command line."
    return {int(m[1]): m[2] for m in re.finditer(r"run (\d+): fruitflow (.*) \(from ", _driver_log(wd))}

def test_driver_starts_again_when_fruitflow_changes(tmp_path):
    """A warm driver whose fruitflow has changed on disk since its imports refuses the next run (which then runs in its own
    process) and starts itself again, same pid; then it serves again. No servers: the runs asked for stop at their options.
    (It touches fruitflow/__init__.py's mtime and puts it back: this test runs before this module starts a keeper.)"""
    from fruitflow.driver import COMMAND, SOCKET, attempt
    import fruitflow
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    (tmp_path/".fruitflow").mkdir()
    with open(tmp_path/".fruitflow"/"driver.log", "w") as log:  # where `up` would point it
        driver = subprocess.Popen([sys.executable, "-c", COMMAND, str(tmp_path)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    init, sock = Path(fruitflow.__file__), tmp_path/SOCKET
    st = init.stat()
    def served(): return _served(tmp_path)
    try:
        end = time.monotonic() + 120
        while not sock.is_socket(): assert time.monotonic() < end and driver.poll() is None; time.sleep(0.2)
        bad = ["run", "--epochs", "0", "--workdir", str(tmp_path)]
        with open(os.devnull, "w") as null:
            fds = (null.fileno(),) * 3
            assert attempt(bad, env=env, fds=fds) == 2 and len(served()) == 1
            os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            assert attempt(bad, env=env, fds=fds) is None and len(served()) == 1  # refused before any fork: the caller runs it
            end = time.monotonic() + 120
            while "starting again" not in _driver_log(tmp_path) or not sock.is_socket():
                assert time.monotonic() < end and driver.poll() is None, _driver_log(tmp_path); time.sleep(0.2)
            assert attempt(bad, env=env, fds=fds) == 2 and len(served()) == 2, _driver_log(tmp_path)
        assert driver.poll() is None and _driver_log(tmp_path).count("serving `fruitflow run`") == 2
    finally:
        os.utime(init, ns=(st.st_atime_ns, st.st_mtime_ns))
        driver.terminate(); driver.wait(30)

@pytest.fixture(scope="module")
def dashboards(tmp_path_factory):
    "`fruitflow up` on free ports in a fresh work folder whose experiment was made by the embedded store: (workdir, Prefect URL, MLflow URL)."
    from mlflow import MlflowClient
    from fruitflow.flow import Config, _experiment
    wd = tmp_path_factory.mktemp("dashboards")
    uri = f"sqlite:///{wd}/mlflow.db"
    _experiment(MlflowClient(uri), Config(workdir=wd), uri)  # as a run without servers leaves it: artifacts at file://<wd>/mlartifacts
    pp, mp = free_port(), free_port()
    p = fruitflow("up", "--prefect-port", pp, "--mlflow-port", mp, workdir=wd, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"http://127.0.0.1:{pp}" in p.stdout and f"http://127.0.0.1:{mp}" in p.stdout, p.stdout
    try: yield wd, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{mp}"
    finally: fruitflow("down", workdir=wd, timeout=120)

def _warm(wd: Path, timeout: float = 300) -> list[dict]:
    "Wait until `fruitflow up`'s keeper offers its warm kernel, the one every step shares: the offers."
    from fruitflow.pool import offers
    end = time.monotonic() + timeout
    while True:
        got = offers(wd)
        if [o["step"] for o in got] == [",".join(STEPS_IN_ORDER)]: return got
        assert time.monotonic() < end, (wd/".fruitflow"/"kernels.log").read_text()[-3000:]
        time.sleep(1)

def _live(pid: int) -> bool:
    try: return (Path(f"/proc/{pid}/stat")).read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError: return False

@pytest.fixture(scope="module")
def warm_pool(dashboards):
    "The warm kernels `fruitflow up`'s keeper offers, once there is one for every step, and its warm driver, ready (before `first_run`)."
    from fruitflow.driver import SOCKET
    got, end = _warm(dashboards[0]), time.monotonic() + 120
    while not (dashboards[0]/SOCKET).is_socket():
        assert time.monotonic() < end, _driver_log(dashboards[0])
        time.sleep(0.2)
    return got

@pytest.fixture(scope="module")
def first_run(dashboards, warm_pool):
    "One pipeline run with the servers up, a warm kernel for every step, and no variable set: (completed process, MLflow run)."
    wd, prefect, mlflow = dashboards
    p = fruitflow(*RUN, workdir=wd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, runs(wd)[0]

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
    p, run = first_run
    assert f"({mlflow})" in p.stdout, p.stdout  # "MLflow run <id> (<tracking uri>)": the server, found through the pid file
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    fr = _api(f"{prefect}/api/flow_runs/{flow_run_id}")
    assert fr["state_type"] == "COMPLETED" and fr["name"] == run.info.run_name, fr
    trs = _api(f"{prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"] for t in trs} == STEPS and all(t["state_type"] == "COMPLETED" for t in trs), [(t["name"], t["state_type"]) for t in trs]
    logs = _api(f"{prefect}/api/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    assert any("synthetic: 12 files" in l["message"] and l["task_run_id"] for l in logs), [l["message"] for l in logs]  # the download step's output
    art = _api(f"{prefect}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    assert len(art) == 1 and art[0]["type"] == "markdown", art
    md = art[0]["data"]
    assert f"| test_accuracy | {run.data.metrics['test_accuracy']:.4g} |" in md and f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in md, md

def test_run_takes_the_warm_kernels_and_the_keeper_makes_new_ones(dashboards, warm_pool, first_run):
    wd = dashboards[0]
    assert "warm kernels kept by `fruitflow up` for: download, preprocess, train, evaluate, register" in first_run[0].stdout, first_run[0].stdout
    log = (Path(first_run[1].data.tags["run_dir"])/"kernels.log").read_text()
    (o,) = warm_pool
    for s in STEPS_IN_ORDER: assert f"step '{s}' runs in the warm kernel kept by `fruitflow up` (its output: .fruitflow/kernels.log), pid {o['pid']}" in log, log
    assert not _live(o["pid"])  # shut down when the run ended
    again = _warm(wd)  # the run is over: the keeper warms new ones
    assert not {o["pid"] for o in again} & {o["pid"] for o in warm_pool}, again
    s = fruitflow("status", workdir=wd, timeout=60).stdout
    keeper = json.loads((wd/".fruitflow"/"kernels.json").read_text())["pid"]
    assert re.search(rf"^kernels +pid {keeper} +warm: download,preprocess,train,evaluate,register  log", s, re.M), s

def test_runs_go_through_the_warm_driver(dashboards, first_run):
    "`fruitflow run` with the servers up was forked by `up`'s warm driver, and its exit code came back from there."
    wd = dashboards[0]
    pid, cmd = next(iter(_served(wd).items()))  # the first run over this folder
    assert cmd.split()[:len(RUN)] == RUN and f"run {pid} exited 0" in _driver_log(wd), _driver_log(wd)
    s = fruitflow("status", workdir=wd, timeout=60).stdout
    driver = json.loads((wd/".fruitflow"/"driver.json").read_text())["pid"]
    assert re.search(rf"^driver +pid {driver} +ready  log ", s, re.M), s

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

def _heartbeats(prefect: str, flow_run_id: str) -> int:
    "How many heartbeat events the Prefect server holds for the flow run."
    return _api(f"{prefect}/api/events/filter", {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                                                            "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})["total"]

def test_heartbeats_only_when_the_user_sets_their_frequency(dashboards, first_run):
    "A flow run sends Prefect's heartbeats (its first at the flow's start) only with PREFECT_FLOWS_HEARTBEAT_FREQUENCY set: `flow.flow_settings`."
    wd, prefect, mlflow = dashboards
    p = fruitflow(*RUN, workdir=wd, env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})  # another PREFECT_ value: run in its own process, not the driver's
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    asked, end = runs(wd)[0].data.tags["prefect.flow_run_id"], time.monotonic() + 60
    while not _heartbeats(prefect, asked):  # the server stores events a moment after they come
        assert time.monotonic() < end, "no heartbeat event for the run that asked for them"
        time.sleep(1)
    assert _heartbeats(prefect, first_run[1].data.tags["prefect.flow_run_id"]) == 0  # sent earlier than the one above, had there been one

def _run_in_background(wd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    cmd = with_handlers([BIN/"fruitflow", *RUN, "--epochs", "400", "--batch-size", "2"], {signal.SIGINT: signal.SIG_DFL})  # passed on, also where these tests run as a background job
    return subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def test_ctrl_c_reaches_a_run_the_driver_forked(dashboards, first_run):
    "Ctrl-C to the command is passed on to its run: the run ends KILLED, the command exits 130 with its one line."
    wd = dashboards[0]
    proc = _run_in_background(wd)
    wait_for(proc, "Epoch 2/")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["fruitflow run: interrupted; the MLflow run is marked KILLED"], err[-3000:]
    run = runs(wd)[0]
    assert run.info.status == "KILLED" and run.data.tags["failed_step"] == "train", (run.info.status, run.data.tags)
    pid = list(_served(wd))[-1]
    assert f"run {pid} exited 130" in _driver_log(wd), _driver_log(wd)

def test_a_killed_command_ends_its_run(dashboards, first_run):
    "A command killed outright (no signal to pass on) closes its connection: the driver sends its run SIGTERM, which ends it KILLED."
    wd = dashboards[0]
    proc = _run_in_background(wd)
    wait_for(proc, "Epoch 2/")
    proc.kill(); proc.communicate()
    pid, end = list(_served(wd))[-1], time.monotonic() + 120
    while f"run {pid} exited" not in _driver_log(wd): assert time.monotonic() < end, _driver_log(wd); time.sleep(0.5)
    assert f"run {pid}: its command closed the connection; SIGTERM sent" in _driver_log(wd), _driver_log(wd)
    assert runs(wd)[0].info.status == "KILLED"

def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen()
        busy = s.getsockname()[1]
        p = fruitflow("up", "--prefect-port", free_port(), "--mlflow-port", busy, workdir=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"port {busy}" in p.stderr and "--mlflow-port" in p.stderr, p.stderr
    assert not list(tmp_path.glob(".fruitflow/*.json"))  # nothing was started

def test_stale_pid_file_is_cleaned(tmp_path):
    (tmp_path/".fruitflow").mkdir()
    (tmp_path/".fruitflow"/"mlflow.json").write_text(json.dumps({"name": "mlflow", "pid": 2**22 + 1, "start": 1, "url": "http://127.0.0.1:1", "log": "x"}))
    p = fruitflow("status", workdir=tmp_path, timeout=60)
    assert p.returncode == 1 and "mlflow   not running" in p.stdout, p.stdout
    assert not (tmp_path/".fruitflow"/"mlflow.json").exists()

def test_user_variables_win(tmp_path, monkeypatch):
    "A running server's URL fills only the variables the user left unset (this process plays the server: its pid file is real)."
    import os
    from fruitflow.cli import env_defaults
    from fruitflow.servers import _start_time
    (tmp_path/".fruitflow").mkdir()
    for n, port in (("prefect", 1), ("mlflow", 2)):
        (tmp_path/".fruitflow"/f"{n}.json").write_text(json.dumps({"name": n, "pid": os.getpid(), "start": _start_time(os.getpid()), "url": f"http://127.0.0.1:{port}", "log": "x"}))
    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "PREFECT_"))]: monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mine.db")
    saved = dict(os.environ)
    try:
        env_defaults(tmp_path)
        assert (os.environ["MLFLOW_TRACKING_URI"], os.environ["PREFECT_API_URL"]) == ("sqlite:///mine.db", "http://127.0.0.1:1/api")
    finally: os.environ.clear(); os.environ.update(saved)  # env_defaults sets more than this test wants to keep

def test_down_stops_everything_it_started(dashboards):
    "`down` during a run: the driver ends the run it forked (KILLED, exit code 130 to its command) before the servers go."
    from fruitflow.pool import offers
    wd = dashboards[0]
    pgids = [json.loads((wd/".fruitflow"/f"{n}.json").read_text())["pid"] for n in ("prefect", "mlflow", "kernels", "driver")]
    kernels = [o["pid"] for o in _warm(wd)]
    assert all(_group(g) for g in pgids)
    proc = _run_in_background(wd)
    wait_for(proc, "[1/5] download")
    pid = list(_served(wd))[-1]
    p = fruitflow("down", workdir=wd, timeout=120)
    assert p.returncode == 0 and all(f"stopped {n}" in p.stdout for n in ("prefect", "mlflow", "kernels", "driver")), p.stdout + p.stderr
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the MLflow run is marked KILLED" in err, err[-3000:]
    assert runs(wd)[0].info.status == "KILLED" and not _live(pid)
    assert "stopping; waiting for 1 run(s)" in _driver_log(wd) and f"run {pid} exited 130" in _driver_log(wd), _driver_log(wd)
    assert not any(_group(g) for g in pgids), {g: _group(g) for g in pgids}
    assert not any(_live(k) for k in kernels) and not offers(wd)
    assert fruitflow("status", workdir=wd, timeout=60).returncode == 1
