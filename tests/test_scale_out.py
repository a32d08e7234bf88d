"""A team's setup, for real: PostgreSQL-backed Prefect and MLflow servers (`fruitflow up --database`), the pipeline
deployed (`fruitflow deploy`), two workers in two folders, and two flow runs started at once through Prefect.

The PostgreSQL server is a throwaway cluster made here with `initdb` and `pg_ctl` (as the `postgres` user when
these tests run as root) on 127.0.0.1 and a free port, with a password that must show up nowhere: not in `up`'s
output, the servers' logs, their pid files or their command lines.
"""
from __future__ import annotations
import contextlib, json, os, pwd, re, secrets, shutil, subprocess, tempfile, time
from pathlib import Path
import pytest
from conftest import BIN, free_port, fruitflow
from test_deploy import TINY, api, clean_env, start_run, wait_final
from fruitflow.config import REGISTER_LIMIT

SECRET = f"pw-{secrets.token_hex(6)}"  # the cluster user's password

def pg_tool(name: str) -> str|None:
    "PostgreSQL's `name` (initdb, pg_ctl): on the PATH or in Debian's /usr/lib/postgresql/<version>/bin."
    if found := shutil.which(name): return found
    return next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)

@pytest.fixture(scope="module")
def postgres():
    "A throwaway PostgreSQL cluster on 127.0.0.1 with user `fruit` and a password: its URL (no database name)."
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if not (initdb and pg_ctl): pytest.skip("PostgreSQL's initdb/pg_ctl are missing (tests/run installs Debian's postgresql when run as root)")
    d = Path(tempfile.mkdtemp(prefix="fruitflow-pg-", dir="/tmp"))
    (d/"pw").write_text(SECRET)
    as_user = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        u = pwd.getpwnam("postgres")
        for p in (d, d/"pw"): os.chown(p, u.pw_uid, u.pw_gid)
        as_user = dict(user=u.pw_uid, group=u.pw_gid)
    run = lambda *cmd: subprocess.run([str(c) for c in cmd], cwd=d, check=True, capture_output=True, timeout=120, **as_user)
    run(initdb, "-D", d/"data", "-U", "fruit", "--pwfile", d/"pw", "--auth", "scram-sha-256", "-E", "UTF8")
    (d/"pw").unlink()
    port = free_port()
    run(pg_ctl, "-D", d/"data", "-l", d/"server.log", "-w", "-o", f"-p {port} -k {d} -c listen_addresses=127.0.0.1", "start")
    try: yield f"postgresql://fruit:{SECRET}@127.0.0.1:{port}"
    finally:
        subprocess.run([pg_ctl, "-D", str(d/"data"), "-m", "fast", "-w", "stop"], cwd=d, capture_output=True, timeout=120, **as_user)
        shutil.rmtree(d, ignore_errors=True)

def query(url: str, db: str, sql: str) -> list[tuple]:
    import psycopg2
    from fruitflow.stores import parse
    p = parse(url)
    with psycopg2.connect(dbname=db, user=p["user"], password=p["password"], host=p["host"], port=p["port"]) as c, c.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()

def cmdlines(pid: int) -> str:
    "The command lines of process group `pid`."
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getpgid(int(d.name)) == pid: out.append((d/"cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError: pass
    return "\n".join(out)

HOLD = """import sys
from prefect.concurrency.sync import concurrency
with concurrency(sys.argv[1], occupy=1, strict=True):
    print("held", flush=True)
    sys.stdin.read()
"""

@contextlib.contextmanager
def holding(prefect_api: str, limit: str):
    "Hold the one slot of Prefect's global concurrency limit `limit` from another process, as a third run's register step would; freed on exit."
    p = subprocess.Popen([BIN/"python", "-c", HOLD, limit], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env(PREFECT_API_URL=prefect_api))
    try:
        assert p.stdout.readline().strip() == "held", f"could not take a slot of {limit} (exit code {p.wait()})"
        yield
    finally:
        p.stdin.close()
        p.wait(60)

def evaluated(client, ids: list[str], prefect_api: str, timeout: float = 900) -> list:
    "The MLflow runs of flow runs `ids` once each has logged its test accuracy (evaluate done); fails if a flow run ends first."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        exp = client.get_experiment_by_name("fruitflow")
        rs = client.search_runs([exp.experiment_id]) if exp else []
        if len(rs) == len(ids) and all("test_accuracy" in r.data.metrics for r in rs): return rs
        states = [api(prefect_api, f"/flow_runs/{i}")["state"]["type"] for i in ids]
        assert not set(states) & {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, states
        time.sleep(2)
    pytest.fail(f"the flow runs did not both reach register in {timeout} s")

@pytest.mark.quick
def test_bad_database_url_is_one_line_without_the_password(tmp_path):
    p = fruitflow("up", "--database", f"postgresql://fruit:{SECRET}@127.0.0.1:{free_port()}", "--prefect-port", free_port(), "--mlflow-port", free_port(), workdir=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "fruitflow up: error: --database: PostgreSQL at fruit@127.0.0.1" in p.stderr, p.stderr
    assert SECRET not in p.stdout + p.stderr

@pytest.mark.quick
def test_up_beyond_loopback_refuses_without_credentials(tmp_path):
    "One line saying how to give them; nothing started."
    p = fruitflow("up", "--host", "0.0.0.0", "--prefect-port", free_port(), "--mlflow-port", free_port(), workdir=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "fruitflow up: error: --host 0.0.0.0 lets other machines reach both servers, so both ask for a password: missing PREFECT_API_AUTH_STRING" in p.stderr
    assert "FRUITFLOW_CREDENTIALS" in p.stderr and not (tmp_path/".fruitflow"/"prefect.json").exists()
    f = tmp_path/"credentials"  # a file others can read is refused before it is read
    f.write_text("PREFECT_API_AUTH_STRING=fruit:s3cret\nMLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=s3cret-s3cret\n")
    f.chmod(0o644)
    p = fruitflow("up", "--auth", "--prefect-port", free_port(), "--mlflow-port", free_port(), workdir=tmp_path, env={"FRUITFLOW_CREDENTIALS": str(f)}, timeout=120)
    assert p.returncode == 1 and p.stderr == f"fruitflow up: error: --auth: FRUITFLOW_CREDENTIALS: {f} can be read by others (mode 644): chmod 600 {f}\n", p.stderr

def test_mlflows_admin_keeps_the_password_of_its_first_start(tmp_path):
    "`up --auth` again with another password: MLflow's basic-auth app kept the first, so `up` says so in one line and stops what it started."
    pp, mp = free_port(), free_port()
    env = {"PREFECT_API_AUTH_STRING": f"fruit:{secrets.token_hex(6)}", "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(8)}
    args = ("up", "--auth", "--prefect-port", pp, "--mlflow-port", mp, "--no-warm-kernel")
    try:
        assert (up := fruitflow(*args, workdir=tmp_path, env=env, timeout=600)).returncode == 0, up.stdout + up.stderr
        fruitflow("down", workdir=tmp_path, timeout=120)
        again = fruitflow(*args, workdir=tmp_path, env=env | {"MLFLOW_TRACKING_PASSWORD": "another-password-1"}, timeout=600)
        assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
        assert "refused the credentials (HTTP 401)" in again.stderr and f"keeps the password of its first start, in {tmp_path.resolve()/'mlflow-auth.db'}" in again.stderr, again.stderr
        assert "another-password-1" not in again.stdout + again.stderr
        assert not (tmp_path/".fruitflow"/"mlflow.json").exists() and not (tmp_path/".fruitflow"/"prefect.json").exists()  # stopped again
    finally: fruitflow("down", workdir=tmp_path, timeout=120)

@pytest.mark.long
def test_two_workers_two_runs_on_postgresql(tmp_path, postgres):
    team, pp, mp = tmp_path/"team", free_port(), free_port()
    team.mkdir()
    up = fruitflow("up", "--database", postgres, "--prefect-port", pp, "--mlflow-port", mp, "--no-warm-kernel", workdir=team, timeout=600)  # the runs are the workers'
    workers, logs = [], []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert SECRET not in up.stdout + up.stderr and f"postgresql://fruit:***@127.0.0.1" in up.stdout, up.stdout
        have = {r[0] for r in query(postgres, "postgres", "select datname from pg_database")}
        assert {"fruitflow_prefect", "fruitflow_mlflow"} <= have, have
        prefect, mlflow_uri = f"http://127.0.0.1:{pp}/api", f"http://127.0.0.1:{mp}"

        assert (d := fruitflow("deploy", workdir=team, timeout=300)).returncode == 0, d.stderr  # finds the servers `up` runs there
        for n in ("w1", "w2"):  # as on two machines: own folders, only the two URLs in common
            (tmp_path/n).mkdir()
            logs.append(open(tmp_path/f"{n}.log", "w"))
            workers.append(subprocess.Popen([BIN/"fruitflow", "worker", "--name", n, "--limit", "1"], cwd=tmp_path/n, stdout=logs[-1], stderr=subprocess.STDOUT,
                                            env=clean_env(PREFECT_API_URL=prefect, MLFLOW_TRACKING_URI=mlflow_uri, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")))
        from mlflow import MlflowClient
        c = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
        with holding(prefect, REGISTER_LIMIT):  # both runs reach register while the slot is taken: without the limit they would promote at once
            ids = [start_run(prefect, *TINY) for _ in range(2)]  # submitted together
            evaluated(c, ids, prefect)
            time.sleep(3)
            waiting = c.search_runs([c.get_experiment_by_name("fruitflow").experiment_id])
            assert not any("registered_version" in r.data.tags for r in waiting), [r.data.tags for r in waiting]  # both wait for the slot
        done = [wait_final(prefect, i, workers[0]) for i in ids]
        assert [f["state"]["type"] for f in done] == ["COMPLETED"] * 2, ([f["state"] for f in done], (tmp_path/"w1.log").read_text()[-3000:], (tmp_path/"w2.log").read_text()[-3000:])
        a, b = done
        assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"], (a["start_time"], a["end_time"], b["start_time"], b["end_time"])  # at once

        rs = c.search_runs([c.get_experiment_by_name("fruitflow").experiment_id])
        assert sorted(r.data.tags["prefect.flow_run_id"] for r in rs) == sorted(ids) and {r.info.status for r in rs} == {"FINISHED"}, [(r.info.status, r.data.tags) for r in rs]
        assert {Path(r.data.tags["run_dir"]).parent.parent.name for r in rs} == {"w1", "w2"}  # one run on each worker
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in rs) and list((team/"mlartifacts").rglob("05_register.ipynb"))  # proxied, kept by the server
        assert sorted(query(postgres, "fruitflow_mlflow", "select status from runs")) == [("FINISHED",), ("FINISHED",)]  # in PostgreSQL, not in a file
        assert len(query(postgres, "fruitflow_prefect", "select id from flow_run")) >= 2

        versions = sorted(c.search_model_versions("name='fruitflow'"), key=lambda v: int(v.version))
        assert [v.version for v in versions] == ["1", "2"], versions
        champ = c.get_model_version_by_alias("fruitflow", "champion")
        reasons = {r.data.tags["registered_version"]: r.data.tags.get("promotion", "") for r in rs}
        # one promotion at a time, though both waited at once: the second was compared with the first (same data, same seed: it ties, so it wins)
        assert "no champion yet" in reasons["1"] and "≥ the champion's" in reasons["2"] and champ.version == "2", (reasons, champ.version)

        st = fruitflow("status", workdir=team)
        assert "deployment fruitflow/fruitflow" in st.stdout and re.search(r"worker +w1 ", st.stdout) and re.search(r"worker +w2 ", st.stdout), st.stdout
        state = team/".fruitflow"
        texts = up.stdout + "".join(p.read_text(errors="replace") for p in state.iterdir() if p.is_file())
        texts += "".join(cmdlines(json.loads((state/f"{n}.json").read_text())["pid"]) for n in ("prefect", "mlflow"))
        assert SECRET not in texts  # not in output, logs, pid files or command lines
    finally:
        down = fruitflow("down", workdir=team, timeout=120)
        alive = [w.poll() is None for w in workers]
        for w in workers:
            w.terminate()
            try: w.wait(30)
            except subprocess.TimeoutExpired: w.kill()
        for l in logs: l.close()
    assert "stopped prefect" in down.stdout and "stopped mlflow" in down.stdout and all(alive), (down.stdout, alive)  # `down` leaves workers alone

@pytest.mark.long
def test_sweep_on_a_separately_started_dask_cluster(tmp_path, prefect_api):
    "`--scheduler`: the trials run in the worker processes of a Dask cluster started beforehand (`dask scheduler`, two `dask worker`s)."
    from conftest import runs
    from test_sweep import TINY as SWEEP
    port, elsewhere, wd = free_port(), tmp_path/"dask", tmp_path/"work"
    elsewhere.mkdir(); wd.mkdir()
    env = clean_env(PREFECT_API_URL=prefect_api)  # the cluster's workers report to the same Prefect server
    logs = [open(tmp_path/f"{n}.log", "w") for n in ("scheduler", "worker1", "worker2")]
    procs = [subprocess.Popen([BIN/"dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], cwd=elsewhere, env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        procs += [subprocess.Popen([BIN/"dask", "worker", f"tcp://127.0.0.1:{port}", "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                                   cwd=elsewhere, env=env, stdout=l, stderr=subprocess.STDOUT) for l in logs[1:]]
        end = time.monotonic() + 120
        while sum("Registered to" in (tmp_path/f"worker{i}.log").read_text() for i in (1, 2)) < 2:
            assert time.monotonic() < end and all(p.poll() is None for p in procs), [(tmp_path/f"{n}.log").read_text()[-2000:] for n in ("scheduler", "worker1")]
            time.sleep(1)
        p = fruitflow("sweep", *SWEEP, "--learning-rate", "0.003", "--augment", "0", "0.5", "--min-accuracy", "0", "--task-runner", "prefect_dask.DaskTaskRunner",
                      "--scheduler", f"tcp://127.0.0.1:{port}", workdir=wd, env={"PREFECT_API_URL": prefect_api})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        all_runs = runs(wd)
        (parent,) = [r for r in all_runs if r.data.tags.get("sweep") == "true"]
        trials = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials) and parent.info.status == "FINISHED"
        assert {t.data.tags["process_id"] for t in trials} <= {str(w.pid) for w in procs[1:]}, [t.data.tags for t in trials]  # in the cluster's workers
        assert "registered fruitflow version" in p.stdout
    finally:
        for pr in reversed(procs):
            pr.terminate()
            try: pr.wait(30)
            except subprocess.TimeoutExpired: pr.kill()
        for l in logs: l.close()

def test_up_on_another_address_asks_for_passwords_and_keeps_the_guards(tmp_path):
    "`up --host 0.0.0.0` with credentials: Prefect asks for its auth string, MLflow for its admin's password, and still refuses host names not in MLFLOW_SERVER_ALLOWED_HOSTS."
    import base64, urllib.error, urllib.request
    pp, mp, auth = free_port(), free_port(), f"fruit:{secrets.token_hex(6)}"
    user, password = "admin", secrets.token_hex(8)
    env = {"PREFECT_API_AUTH_STRING": auth, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password,
           "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{mp},fruit.example:{mp}"}
    up = fruitflow("up", "--host", "0.0.0.0", "--prefect-port", pp, "--mlflow-port", mp, "--no-warm-kernel", workdir=tmp_path, env=env, timeout=600)  # the guards are the point, not a kernel
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "the servers listen on 0.0.0.0" in up.stderr and "ask for the credentials given" in up.stderr, up.stderr
        assert auth not in up.stdout + up.stderr and password not in up.stdout + up.stderr
        def status(url, headers={}):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r: return r.status
            except urllib.error.HTTPError as e: return e.code
        basic = lambda pair: {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        assert (status(f"http://127.0.0.1:{pp}/api/admin/version"), status(f"http://127.0.0.1:{pp}/api/admin/version", basic(auth))) == (401, 200)
        search = f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/search?max_results=1"
        mine = basic(f"{user}:{password}")
        assert (status(search), status(search, mine | {"Host": f"fruit.example:{mp}"}), status(search, mine | {"Host": f"evil.example:{mp}"})) == (401, 200, 403)
        st = fruitflow("status", workdir=tmp_path, env=env)
        assert st.returncode == 0 and st.stdout.count("healthy, password") == 2, st.stdout + st.stderr
        wrong = fruitflow("run", "--source", "synthetic", workdir=tmp_path, env=env | {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, timeout=300)
        assert wrong.returncode == 1 and wrong.stderr.strip().endswith("refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), wrong.stderr
        assert "not-the-password" not in wrong.stdout + wrong.stderr
    finally: fruitflow("down", workdir=tmp_path, timeout=120)
