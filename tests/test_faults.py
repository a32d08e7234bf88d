"""Faults caused for real: a killed kernel, a cell past its time limit, SIGTERM mid-training, unreachable servers,
an MLflow server killed mid-run, an artifact store that is full or turns read-only (real tmpfs mounts)."""
import contextlib, json, os, re, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import psutil, pytest
from conftest import BIN, FAST, SYNTHETIC_RUN, free_port, fruitflow, mlflow_client, runs, wait_for as _wait_for, with_handlers
from fruitflow.config import STEPS

SLOW_TRAIN = ["--source", "synthetic", "--n-per-class", "6", "--image-size", "32", "--batch-size", "2", "--epochs", "400", "--model", "small"]

def _start(wd: Path, prefect_api: str|None, *args, handlers: dict|None = None) -> subprocess.Popen:
    "`fruitflow run ARGS` in `wd`, running on; without `prefect_api` it finds the servers `fruitflow up` started there; `handlers`: signal → SIG_DFL or SIG_IGN it starts with (as a terminal's job, or nohup's, whatever these tests inherited)."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | ({"PREFECT_API_URL": prefect_api} if prefect_api else {})
    cmd = [str(BIN/"fruitflow"), "run", *args]
    return subprocess.Popen(with_handlers(cmd, handlers) if handlers else cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def _kernels(proc: subprocess.Popen, step: str = "") -> list:
    "The process's Jupyter kernels; with `step`, the one started for that step, alone or with others (fruitflow marks the kernel it starts for the steps)."
    def running(p):
        try: return "ipykernel" in " ".join(p.cmdline()) and (not step or step in p.environ().get("FRUITFLOW_STEP", "").split(","))
        except psutil.Error: return False  # gone, or a zombie: not a running kernel
    try: return [p for p in psutil.Process(proc.pid).children(recursive=True) if running(p)]
    except psutil.NoSuchProcess: return []

def test_killed_kernel_fails_the_run(tmp_path, prefect_api):
    "The kernel is killed while train runs (it has said which model it builds): the run fails there; --resume reruns from train (tiny options: the resumed run keeps them)."
    proc = _start(tmp_path, prefect_api, "--source", "synthetic", "--n-per-class", "6", *FAST)
    _wait_for(proc, "model: small")  # printed by the train step: its kernel is busy with it (a kernel killed before a step takes it is replaced)
    (kernel,) = _kernels(proc, "train")
    kernel.kill()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    assert "step 'train' failed" in err and "kernel died" in err and "Traceback" not in err, err
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == "train"
    # resuming reuses download and preprocess, reruns train onwards, in the same MLflow run
    env = {"PREFECT_API_URL": prefect_api}
    p = fruitflow("run", "--resume", workdir=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "[1/5] download unchanged: reused" in p.stdout and "[2/5] preprocess unchanged: reused" in p.stdout
    assert "[3/5] train done" in p.stdout and "[5/5] register done" in p.stdout
    (again,) = runs(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    # --only evaluate: reruns that step; register still matches its key (same model, same accuracy) or is reported stale
    p = fruitflow("run", "--only", "evaluate", workdir=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "[3/5] train unchanged: reused" in p.stdout and "[4/5] evaluate done" in p.stdout and "[5/5] register ..." not in p.stdout
    (again,) = runs(tmp_path)
    assert again.info.status == ("FINISHED" if "[5/5] register unchanged" in p.stdout else "KILLED")
    # options of a resumed run cannot change
    p = fruitflow("run", "--resume", "--epochs", "3", workdir=tmp_path, env=env, timeout=60)
    assert p.returncode == 2 and "start a new run to change --epochs" in p.stderr, p.stderr

def test_cell_over_the_time_limit_fails_the_run(tmp_path, prefect_api):
    "A 2 s limit: some cell (at the latest train's TensorFlow import, ~6 s) runs past it; nbclient interrupts it."
    p = fruitflow("run", *SLOW_TRAIN, "--step-timeout", "2", workdir=tmp_path, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "failed: a cell ran longer than the step's limit of 2 s" in err[0], p.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and f"step '{run.data.tags['failed_step']}' failed" in err[0]

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])  # SIGHUP: the terminal closed
def test_sigterm_during_training_kills_run_and_kernel(tmp_path, prefect_api, sig):
    proc = _start(tmp_path, prefect_api, *SLOW_TRAIN, handlers={sig: signal.SIG_DFL})
    _wait_for(proc, "Epoch 2/")
    kernels = _kernels(proc)
    assert kernels
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "KILLED" in err and "Traceback" not in err, err
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags.get("failed_step") == "train"
    psutil.wait_procs(kernels, timeout=30)
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kernels), "kernel left running"

def test_a_sighup_ignored_at_start_stays_ignored(tmp_path, prefect_api):
    "nohup: a run started with SIGHUP ignored trains on after one; SIGTERM then ends it KILLED."
    proc = _start(tmp_path, prefect_api, *SLOW_TRAIN, handlers={signal.SIGHUP: signal.SIG_IGN})
    _wait_for(proc, "Epoch 2/")
    proc.send_signal(signal.SIGHUP)
    _wait_for(proc, "Epoch 4/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "KILLED" in err, err[-3000:]
    assert runs(tmp_path)[0].info.status == "KILLED"

@pytest.mark.quick
def test_unreachable_mlflow_server_is_one_line_within_10_s(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    p = fruitflow("run", "--source", "synthetic", workdir=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
    assert time.monotonic() - t < 10
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and uri in p.stderr, p.stderr
    assert not (tmp_path/"mlflow.db").exists() and not (tmp_path/"runs").exists()

@pytest.mark.quick
def test_unreachable_prefect_server_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    p = fruitflow("run", "--source", "synthetic", workdir=tmp_path, env={"PREFECT_API_URL": url}, timeout=60)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and url in p.stderr, p.stderr
    assert not (tmp_path/"runs").exists()

@pytest.mark.long
def test_two_pipelines_at_once_in_one_workdir(tmp_path, prefect_api, synthetic_run):
    """Both complete on a store neither has created yet: own run folder, own MLflow run, consistent registry. One runs each step
    in a kernel of its own, with `synthetic_run`'s options: sharing one kernel changes nothing the steps compute, the same model to the same figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | {"PREFECT_API_URL": prefect_api}
    own = [*SYNTHETIC_RUN, "--kernel-per-step"]  # as the shared run, with a kernel per step
    procs = [subprocess.Popen([str(BIN/"fruitflow"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (own, ["run", "--source", "synthetic", "--n-per-class", "6", *FAST, "--seed", "2"])]  # the other with the kernel its steps share
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
        assert "locked" not in out + err and "Traceback" not in err
    done = runs(tmp_path)
    assert len(done) == 2 and all(r.info.status == "FINISHED" for r in done)
    assert len({r.data.tags["run_dir"] for r in done}) == 2
    from conftest import mlflow_client
    versions = mlflow_client(tmp_path).search_model_versions("name='fruitflow'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert sorted(r.data.tags["registered_version"] for r in done) == ["1", "2"]
    logs = [(Path(r.data.tags["run_dir"])/"kernels.log").read_text() for r in done]
    assert sorted(l.count("ran in a kernel of its own,") for l in logs) == [0, 5] and sorted(l.count("the kernel the steps share") for l in logs) == [0, 5], logs
    (per_step,) = [r for r in done if r.data.params["seed"] == "42"]
    log = (Path(per_step.data.tags["run_dir"])/"kernels.log").read_text()
    pids = {re.search(rf"step '{s}' ran in a kernel of its own, pid (\d+)", log)[1] for s in STEPS}
    assert len(pids) == len(STEPS), log[-3000:]  # five kernels
    shared = synthetic_run[2]
    shared_log = (Path(shared.data.tags["run_dir"])/"kernels.log").read_text()
    assert len(set(re.findall(r"ran in the kernel the steps share, pid (\d+)", shared_log))) == 1 and "of its own" not in shared_log, shared_log  # one there
    for k in ("loss", "val_loss", "test_loss", "test_accuracy", "f1_apple"):
        assert per_step.data.metrics[k] == shared.data.metrics[k], (k, per_step.data.metrics[k], shared.data.metrics[k])

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]

@pytest.mark.long
def test_mlflow_server_lost_mid_run_and_mid_sweep_ends_every_run_once_it_is_back(tmp_path):
    """The MLflow server `fruitflow up` started is killed as a run's training starts: bounded retries, one line, and `fruitflow up`
    marks the run FAILED later. Then, on the same servers, it is killed as a sweep's trials start: one line, and `up` marks the
    sweep's run and both trials' FAILED later."""
    ports = ["--prefect-port", free_port(), "--mlflow-port", free_port(), "--no-warm-kernel"]  # a lost MLflow server is the point, not the kernel
    assert (up := fruitflow("up", "--workdir", tmp_path, *ports, workdir=tmp_path, timeout=400)).returncode == 0, up.stdout + up.stderr
    uri = f"http://127.0.0.1:{ports[3]}"
    kill_mlflow = lambda: os.killpg(json.loads((tmp_path/".fruitflow"/"mlflow.json").read_text())["pid"], signal.SIGKILL)  # the server and its workers
    try:
        proc = _start(tmp_path, None, "--source", "synthetic", "--n-per-class", "6", *FAST)
        _wait_for(proc, "[3/5] train ...")
        kill_mlflow()
        t = time.monotonic()
        out, err = proc.communicate(timeout=300)
        assert time.monotonic() - t < 150  # retries are bounded
        line = _one_line(err)
        assert proc.returncode == 1 and "step 'train' failed" in line and uri in line and "not marked FAILED yet" in line, err
        (run,) = runs(tmp_path)  # read from the server's own store while it is down
        assert run.info.status == "RUNNING"  # what a lost server leaves behind ...
        again = fruitflow("up", "--workdir", tmp_path, *ports, workdir=tmp_path, timeout=400)
        assert again.returncode == 0 and f"MLflow run {run.info.run_id} marked FAILED" in again.stdout, again.stdout + again.stderr
        (run,) = runs(tmp_path)  # ... until it is back
        assert run.info.status == "FAILED" and run.data.tags["failed_step"] == "train" and "lost the MLflow server" in run.data.tags["error"]
        assert not list(tmp_path.glob("runs/*/pending.json"))

        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
        proc = subprocess.Popen([str(BIN/"fruitflow"), "sweep", "--source", "synthetic", "--n-per-class", "6", *FAST, "--width", "8", "--learning-rate", "0.003",
                                 "--augment", "0", "0.5", "--workers", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = ""
        while not ("[trial-01] start" in seen and "[trial-02] start" in seen): seen += _wait_for(proc, "] start")  # both trials' runs made
        kill_mlflow()
        out, err = proc.communicate(timeout=300)
        line = _one_line(err)
        assert proc.returncode == 1 and uri in line and "not marked FAILED yet" in line, out[-2000:] + err
        assert len(list(tmp_path.glob("runs/*/pending.json"))) == 1 and len(list(tmp_path.glob("runs/*/trial-*/pending.json"))) == 2
        swept = lambda: [r for r in runs(tmp_path) if r.info.run_id != run.info.run_id]  # the sweep's run and its trials
        assert [r.info.status for r in swept()] == ["RUNNING"] * 3  # read from the server's own store while it is down
        again = fruitflow("up", "--workdir", tmp_path, *ports, workdir=tmp_path, timeout=400)
        assert again.returncode == 0 and again.stdout.count(" marked FAILED") == 3, again.stdout + again.stderr
        done = swept()
        assert [r.info.status for r in done] == ["FAILED"] * 3
        trials = [r for r in done if "mlflow.parentRunId" in r.data.tags]
        (parent,) = [r for r in done if r.data.tags.get("sweep") == "true"]
        assert "does not answer" in parent.data.tags["error"], parent.data.tags
        assert len(trials) == 2 and all("mlflow" in t.data.tags.get("error", "").lower() for t in trials), [t.data.tags for t in trials]  # what failed, as far as it got
        assert not list(tmp_path.glob("runs/**/pending.json"))
    finally: fruitflow("down", "--workdir", tmp_path, workdir=tmp_path)

@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    "A real tmpfs of `size` mounted at `path` (needs mount rights: root, as in CI here)."
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): an artifact store that is full or read-only needs one")
    try: yield path
    finally: subprocess.run(["umount", "-l", str(path)])

def test_full_artifact_store_fails_the_run_and_registers_nothing(tmp_path, prefect_api):
    with tmpfs(tmp_path/"mlartifacts", "64k"):  # the embedded store's artifacts; a model does not fit
        p = fruitflow("run", "--source", "synthetic", "--n-per-class", "6", *FAST, workdir=tmp_path, env={"PREFECT_API_URL": prefect_api})
    line = _one_line(p.stderr)
    assert p.returncode == 1 and "No space left on device" in line, p.stderr
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED" and f"step '{run.data.tags['failed_step']}' failed" in line
    assert mlflow_client(tmp_path).search_model_versions("name='fruitflow'") == []

@pytest.mark.long
def test_artifact_store_turning_read_only_at_register_undoes_the_registration(tmp_path, prefect_api):
    "The register step's version is made, then its notebook cannot be logged: the version goes, the old champion keeps its alias."
    args, env = ["--source", "synthetic", "--n-per-class", "6", "--min-accuracy", "0", "--min-test-images", "0", *FAST], {"PREFECT_API_URL": prefect_api}
    with tmpfs(tmp_path/"mlartifacts", "256m") as store:
        assert (first := fruitflow("run", *args, workdir=tmp_path, env=env)).returncode == 0, first.stderr  # version 1, the champion
        proc = _start(tmp_path, prefect_api, *args)
        _wait_for(proc, "[5/5] register ...")
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        out, err = proc.communicate(timeout=300)
    line = _one_line(err)
    assert proc.returncode == 1 and "step 'register' failed" in line and "Read-only file system" in line, err
    failed = runs(tmp_path)[0]
    assert failed.info.status == "FAILED" and failed.data.tags["failed_step"] == "register"
    assert "registered_version" not in failed.data.tags and failed.data.tags["registration_undone"].startswith("version 2 of fruitflow deleted")
    assert "registered fruitflow version 2" in out  # it was made ...
    c = mlflow_client(tmp_path)
    assert [int(v.version) for v in c.search_model_versions("name='fruitflow'")] == [1]  # ... and undone
    assert int(c.get_model_version_by_alias("fruitflow", "champion").version) == 1

def _temporary_server(wd: Path) -> psutil.Process:
    "The process of the Prefect temporary server a run in `wd` started (its log names the port)."
    port = (wd/"prefect_home"/"temporary-server.log").read_text().split("http://127.0.0.1:")[-1].split("/")[0]
    (srv,) = [c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)]
    return psutil.Process(srv)

def test_ctrl_c_on_a_cold_run_ends_it_in_seconds_and_kill_9_leaves_no_server(tmp_path):
    """No Prefect server given: the run starts Prefect's temporary server. Ctrl-C in the terminal (SIGINT to the whole
    process group) reaches the run but not its server, so the run reports its end to Prefect and stops the server:
    seconds, not minutes of retries against a server the same Ctrl-C had stopped. A run killed outright leaves no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    (wd := tmp_path/"ctrl-c").mkdir()
    as_in_a_terminal = with_handlers([BIN/"fruitflow", "run", *SLOW_TRAIN], {signal.SIGINT: signal.SIG_DFL})  # SIGINT not ignored, also where these tests run as a background job
    proc = subprocess.Popen(as_in_a_terminal, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # a process group of its own, as a terminal's job
    _wait_for(proc, "Epoch 2/")
    server = _temporary_server(wd)
    os.killpg(proc.pid, signal.SIGINT)
    t = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - t < 30, (time.monotonic() - t, err[-3000:])
    assert err.strip().splitlines() == ["fruitflow run: interrupted; the MLflow run is marked KILLED"], err[-3000:]
    (run,) = runs(wd)
    assert run.info.status == "KILLED"
    with contextlib.closing(sqlite3.connect(wd/"prefect_home"/"prefect.db")) as db:  # the server heard the end of the flow run
        assert db.execute("select state_type from flow_run").fetchall() == [("CRASHED",)]
    server.wait(10)  # and was stopped on the run's way out
    (wd := tmp_path/"kill-9").mkdir()
    proc = subprocess.Popen([str(BIN/"fruitflow"), "run", *SLOW_TRAIN], cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, "[2/5] preprocess")
    server = _temporary_server(wd)
    proc.kill(); proc.communicate()
    server.wait(10)  # it noticed its run was gone
