"""A team across machines, for real: a server host and two worker hosts, each a Linux network namespace with an
address of its own on a private link that the test makes and removes (a bridge in a fourth namespace; no route to
anything else, this machine's own addresses included). The hosts share this machine's file system, as a shared
folder would; they share no network.

- the server host runs PostgreSQL on its address and `fruitflow up --host <its address> --database ...`, both
  servers asking for credentials (Prefect's auth string, MLflow's basic-auth app with the admin `up` creates);
- from a worker host, requests without credentials are refused (Prefect's API, MLflow's REST API, UI and
  artifact proxy: 401) and the health checks answer;
- `fruitflow deploy` and a `fruitflow worker` on each worker host, with the two URLs and the credentials only (one
  from a 600 file, one from the environment); two flow runs run one on each, uploading through MLflow's artifact
  proxy, FINISHED, promoted one after the other; `fruitflow status` on a worker host lists it all;
- a sweep's trials on a Dask cluster whose scheduler is on the server host and whose workers are on the two
  worker hosts.

The faults across these hosts (a link cut, a server restarted) are in `test_hosts_faults.py`, on a set of hosts
of its own, so that pytest-xdist runs the two modules at once.

Network namespaces need root (CI runs as root); as another user these tests are skipped, saying why.
"""
from __future__ import annotations
import contextlib, json, os, pwd, re, secrets, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path
import pytest
from conftest import BIN
from test_scale_out import pg_tool

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                               reason="network namespaces need root and iproute2's `ip` (CI runs as root)")
pytestmark = [ROOT_ONLY, pytest.mark.xdist_group("hosts")]  # its module-scoped hosts and servers: one worker runs the module

AUTH = {"PREFECT_API_AUTH_STRING": f"fruit:{secrets.token_hex(8)}", "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(8)}  # 16 characters: MLflow wants 12 or more
PG_SECRET = f"pg-{secrets.token_hex(6)}"
NET = "10.213.7"  # the private link's /24

def sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, timeout=120, **kw)

def clean_env(**extra) -> dict:
    "This process's environment without Prefect's, MLflow's and fruitflow's settings (a fresh shell on another host)."
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "FRUITFLOW_"))} | extra

class Host:
    "A network namespace on the private link: its name, its address, its end of the link (in the bridge's namespace)."
    def __init__(self, ns: str, addr: str, port: str, hub: str): self.ns, self.addr, self.port, self.hub = ns, addr, port, hub
    def cmd(self, *cmd) -> list[str]: return ["ip", "netns", "exec", self.ns, *map(str, cmd)]
    def run(self, *cmd, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*cmd), env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    def start(self, *cmd, log: Path, env=None, cwd=None) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(self.cmd(*cmd), env=env or clean_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    def link(self, up: bool) -> None:
        "Plug this host's cable in or pull it out."
        sh("ip", "-n", self.hub, "link", "set", self.port, "up" if up else "down")
    def pids(self) -> list[int]: return [int(p) for p in sh("ip", "netns", "pids", self.ns, check=False).stdout.split()]

def alive(pid: int) -> bool:
    "Is process `pid` running (not gone, not a zombie)?"
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError): return False

@contextlib.contextmanager
def hosts(*names: str):
    "Namespaces `names` on a private bridge, with addresses NET.1, NET.2, ...; every process in them killed and every namespace and link removed at the end, whatever happened."
    tag = f"ff{os.getpid() % 100000}"
    hub, made = f"{tag}-hub", []
    try:
        sh("ip", "netns", "add", hub); made.append(hub)
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        out = {}
        for i, n in enumerate(names, 1):
            ns, a, b = f"{tag}-{n}", f"{tag}v{i}a", f"{tag}v{i}b"
            sh("ip", "netns", "add", ns); made.append(ns)
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)  # both ends leave this namespace next
            sh("ip", "link", "set", a, "netns", hub)
            sh("ip", "link", "set", b, "netns", ns)
            sh("ip", "-n", hub, "link", "set", a, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{i}/24", "dev", b)
            for dev in (b, "lo"): sh("ip", "-n", ns, "link", "set", dev, "up")
            out[n] = Host(ns, f"{NET}.{i}", a, hub)
        yield out
    finally:
        stuck = []
        for ns in made:  # every process still in a namespace, then the namespace (its links go with it)
            pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in pids:
                    with contextlib.suppress(ProcessLookupError): os.kill(p, sig)
                end = time.monotonic() + 20
                while pids and time.monotonic() < end:
                    pids = [p for p in pids if alive(p)]
                    time.sleep(0.2)
            stuck += pids
        for ns in reversed(made): sh("ip", "netns", "del", ns, check=False)
        for i in range(1, len(names) + 1): sh("ip", "link", "del", f"{tag}v{i}a", check=False)  # made, not yet moved
        left = [f"process {p}" for p in stuck] + [l for l in sh("ip", "netns", "list").stdout.splitlines() if l.startswith(tag)]
        left += [l for l in sh("ip", "-o", "link").stdout.splitlines() if f" {tag}v" in l]
        assert not left, f"left behind: {left}"  # processes, namespaces, links

def http_status(host: Host, url: str, auth: str = "") -> int:
    "The HTTP status `url` answers from `host` (basic auth `user:password` if given)."
    code = ("import base64, sys, urllib.request as u, urllib.error as e\n"
            "h = {'Authorization': 'Basic ' + base64.b64encode(sys.argv[2].encode()).decode()} if sys.argv[2] else {}\n"
            "try: print(u.urlopen(u.Request(sys.argv[1], headers=h), timeout=30).status)\n"
            "except e.HTTPError as x: print(x.code)\n")
    p = host.run(sys.executable, "-c", code, url, auth, timeout=60)
    assert p.returncode == 0, p.stderr
    return int(p.stdout)

def wait_until(check, what: str, timeout: float = 300, every: float = 1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := check(): return got
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout} s")

@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The server host with PostgreSQL and `fruitflow up` on its address, both servers asking for `AUTH`; two worker
    hosts. A dict: hosts, URLs, folders, the environment of a client with credentials."""
    initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
    if not (initdb and pg_ctl): pytest.skip("PostgreSQL's initdb/pg_ctl are missing (tests/run installs Debian's postgresql when run as root)")
    root = tmp_path_factory.mktemp("hosts")
    with hosts("server", "w1", "w2") as h:
        srv = h["server"]
        pg = Path(tempfile.mkdtemp(prefix="fruitflow-pg-", dir="/tmp"))
        u = pwd.getpwnam("postgres")
        (pg/"pw").write_text(PG_SECRET)
        for p in (pg, pg/"pw"): os.chown(p, u.pw_uid, u.pw_gid)
        as_pg = lambda *cmd: sh("ip", "netns", "exec", srv.ns, "runuser", "-u", "postgres", "--", *cmd, cwd=pg)
        try:
            as_pg(initdb, "-D", pg/"data", "-U", "fruit", "--pwfile", pg/"pw", "--auth", "scram-sha-256", "-E", "UTF8")
            (pg/"pw").unlink()
            with open(pg/"data"/"pg_hba.conf", "a") as f: f.write(f"host all fruit {NET}.0/24 scram-sha-256\n")  # the link's hosts
            as_pg(pg_ctl, "-D", pg/"data", "-l", pg/"server.log", "-w", "-o", f"-p 5432 -k {pg} -c listen_addresses={srv.addr}", "start")
            team_dir = root/"team"; team_dir.mkdir()
            up_again = lambda: srv.run(BIN/"fruitflow", "up", "--host", srv.addr, "--database", f"postgresql://fruit:{PG_SECRET}@{srv.addr}:5432",
                                       "--no-warm-kernel", "--workdir", team_dir, env=clean_env(**AUTH), timeout=600)
            up = up_again()
            assert up.returncode == 0, up.stdout + up.stderr
            urls = dict(PREFECT_API_URL=f"http://{srv.addr}:8080/api", MLFLOW_TRACKING_URI=f"http://{srv.addr}:5000")
            yield dict(hosts=h, up=up, up_again=up_again, root=root, team=team_dir, urls=urls, client=clean_env(**urls, **AUTH))
        finally:
            srv.run(BIN/"fruitflow", "down", "--workdir", root/"team", env=clean_env(**AUTH))
            with contextlib.suppress(subprocess.SubprocessError): as_pg(pg_ctl, "-D", pg/"data", "-m", "fast", "-w", "stop")
            shutil.rmtree(pg, ignore_errors=True)

@pytest.mark.long
def test_unauthenticated_requests_from_another_host_are_refused(team):
    w1 = team["hosts"]["w1"]
    prefect, mlflow = team["urls"]["PREFECT_API_URL"], team["urls"]["MLFLOW_TRACKING_URI"]
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    guarded = {"Prefect's API": (f"{prefect}/admin/version", AUTH["PREFECT_API_AUTH_STRING"]),
               "MLflow's REST API": (search, f"{AUTH['MLFLOW_TRACKING_USERNAME']}:{AUTH['MLFLOW_TRACKING_PASSWORD']}"),
               "MLflow's UI": (f"{mlflow}/", f"{AUTH['MLFLOW_TRACKING_USERNAME']}:{AUTH['MLFLOW_TRACKING_PASSWORD']}"),
               "MLflow's artifact proxy": (f"{mlflow}/api/2.0/mlflow-artifacts/artifacts",
                                           f"{AUTH['MLFLOW_TRACKING_USERNAME']}:{AUTH['MLFLOW_TRACKING_PASSWORD']}")}
    got = {k: (http_status(w1, u), http_status(w1, u, "admin:wrong-password-0"), http_status(w1, u, a)) for k, (u, a) in guarded.items()}
    assert got == {k: (401, 401, 200) for k in guarded}, got  # none, wrong, right
    assert [http_status(w1, u) for u in (f"{prefect}/health", f"{mlflow}/health")] == [200, 200]  # health checks stay open
    up, team_dir = team["up"], team["team"]
    state = team_dir/".fruitflow"
    texts = up.stdout + up.stderr + "".join(p.read_text(errors="replace") for p in state.iterdir() if p.is_file())
    assert not [v for v in (*AUTH.values(), PG_SECRET) if len(v) > 5 and v in texts]  # no secret in output, logs, pid files, MLflow's auth configuration
    assert "listen on " + team["hosts"]["server"].addr in up.stderr

TINY = ["-p", "source=synthetic", "-p", "epochs=1", "-p", "image_size=32", "-p", "batch_size=4", "-p", "n_per_class=8",
        "-p", "model_kind=small", "-p", "min_test_images=0"]  # plumbing: the small CNN, a champion on a tiny test split
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

@pytest.fixture(scope="module")
def workers(team):
    "The deployment, made from worker host w1; a `fruitflow worker` on each worker host, in a folder of its own, credentials from a 600 file on w1 and from the environment on w2."
    h, root = team["hosts"], team["root"]
    creds = root/"credentials"
    creds.touch(0o600)
    creds.write_text("".join(f"{k}={v}\n" for k, v in AUTH.items()))
    from_file = clean_env(**team["urls"], FRUITFLOW_CREDENTIALS=str(creds))
    d = h["w1"].run(BIN/"fruitflow", "deploy", env=from_file, cwd=root)
    assert d.returncode == 0, d.stdout + d.stderr
    fast = dict(PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="2")
    procs = []
    try:
        for host, env in ((h["w1"], from_file | fast), (h["w2"], team["client"] | fast)):
            (root/host.ns).mkdir()
            procs.append(host.start(BIN/"fruitflow", "worker", "--name", host.ns, "--limit", "1", log=root/f"{host.ns}.log", env=env, cwd=root/host.ns))
        yield dict(procs=procs, from_file=from_file)
    finally:
        for w in procs:
            w.terminate()
            try: w.wait(30)
            except subprocess.TimeoutExpired: w.kill()

def start_runs(team, n: int, *params: str) -> list[str]:
    "Flow runs of the deployment created from worker host w1 with Prefect's CLI, as a user would: their ids."
    ids = []
    for _ in range(n):
        p = team["hosts"]["w1"].run(BIN/"prefect", "deployment", "run", "fruitflow/fruitflow", *TINY, *params, env=team["client"], timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        ids.append(re.search(r"UUID: ([0-9a-f-]{36})", p.stdout).group(1))
    return ids

def states(team, ids: list[str]) -> list[str]:
    "The flow runs' state types, asked from worker host w2."
    p = team["hosts"]["w2"].run(sys.executable, "-c", "import sys; from prefect import get_client\nwith get_client(sync_client=True) as c: print(*(c.read_flow_run(i).state.type.value for i in sys.argv[1:]))",
                                *ids, env=team["client"], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.split()

def worker_logs(team) -> list[str]: return [(team["root"]/f"{w.ns}.log").read_text()[-3000:] for w in (team["hosts"]["w1"], team["hosts"]["w2"])]

@pytest.mark.long
def test_two_worker_hosts_two_runs(team, workers):
    "Two flow runs, one on each worker host's worker, with only the two URLs and credentials there."
    h, root, client = team["hosts"], team["root"], team["client"]
    w1, w2 = h["w1"], h["w2"]
    ids = start_runs(team, 2)
    def final():
        assert all(w.poll() is None for w in workers["procs"]), worker_logs(team)
        got = states(team, ids)
        return got if all(s in FINAL for s in got) else None
    got = wait_until(final, "both flow runs final", timeout=900, every=3)
    assert got == ["COMPLETED", "COMPLETED"], (got, worker_logs(team))

    st = w1.run(BIN/"fruitflow", "status", env=workers["from_file"], cwd=root)
    assert st.returncode == 0, st.stdout + st.stderr
    for line in (r"prefect +http://\S+:8080 +from the environment +healthy", r"mlflow +http://\S+:5000 +from the environment +healthy",
                 r"deployment fruitflow/fruitflow", rf"worker +{w1.ns} ", rf"worker +{w2.ns} "):
        assert re.search(line, st.stdout), (line, st.stdout)

    # this test's own process has no route to the server host: ask from a worker host
    p = w2.run(sys.executable, "-c", RUNS, env=client, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rs = json.loads(p.stdout)
    rs["runs"] = [r for r in rs["runs"] if r["flow_run"] in ids]
    assert sorted(r["flow_run"] for r in rs["runs"]) == sorted(ids) and {r["status"] for r in rs["runs"]} == {"FINISHED"}, rs
    assert {Path(r["run_dir"]).parent.parent.name for r in rs["runs"]} == {w1.ns, w2.ns}  # one on each worker host
    assert all(r["artifact_uri"].startswith("mlflow-artifacts:") for r in rs["runs"])  # uploaded through the proxy ...
    for r in rs["runs"]:  # ... and kept by the server host
        assert list((team["team"]/"mlartifacts").glob(f"*/{r['run_id']}/artifacts/notebooks/05_register.ipynb")), r
    reasons = {r["version"]: r["promotion"] for r in rs["runs"]}
    assert "no champion yet" in reasons["1"] and "≥ the champion's" in reasons["2"] and rs["champion"] == "2", rs  # one after the other

RUNS = """import json
from mlflow import MlflowClient
c = MlflowClient()
rs = [r for r in c.search_runs([c.get_experiment_by_name("fruitflow").experiment_id])
      if r.data.tags.get("sweep") != "true" and "mlflow.parentRunId" not in r.data.tags]  # pipeline runs, not a sweep's
try: champion = c.get_model_version_by_alias("fruitflow", "champion").version
except Exception: champion = ""  # none yet
print(json.dumps(dict(champion=champion, runs=[dict(
    flow_run=r.data.tags["prefect.flow_run_id"], run_id=r.info.run_id, status=r.info.status, run_dir=r.data.tags["run_dir"], artifact_uri=r.info.artifact_uri,
    version=r.data.tags.get("registered_version", ""), promotion=r.data.tags.get("promotion", "")) for r in rs])))
"""

@pytest.mark.long
def test_sweep_on_dask_workers_on_two_hosts(team):
    "The scheduler on the server host, a `dask worker` on each worker host; the sweep's trials run on both."
    h, root, client = team["hosts"], team["root"], team["client"]
    srv, w1, w2 = h["server"], h["w1"], h["w2"]
    sched = srv.start(BIN/"dask", "scheduler", "--host", srv.addr, "--port", 8786, "--no-dashboard", log=root/"scheduler.log", env=client, cwd=root)
    dask = [w.start(BIN/"dask", "worker", f"tcp://{srv.addr}:8786", "--host", w.addr, "--nthreads", 1, "--no-nanny", "--no-dashboard",
                    "--name", w.ns, log=root/f"dask-{w.ns}.log", env=client, cwd=root) for w in (w1, w2)]
    try:
        wait_until(lambda: sum("Registered to" in (root/f"dask-{w.ns}.log").read_text() for w in (w1, w2)) == 2
                   and all(p.poll() is None for p in [sched, *dask]) or None, "both Dask workers registered", timeout=180)
        wd = root/"sweep"; wd.mkdir()
        p = srv.run(BIN/"fruitflow", "sweep", "--source", "synthetic", "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--n-per-class", "8",
                    "--model", "small", "--learning-rate", "0.003", "--augment", "0", "0.5", "--min-accuracy", "0",
                    "--task-runner", "prefect_dask.DaskTaskRunner", "--scheduler", f"tcp://{srv.addr}:8786", "--workdir", wd, env=client, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        q = srv.run(sys.executable, "-c", TRIALS, env=client, timeout=120)
        assert q.returncode == 0, q.stderr[-3000:]
        trials = json.loads(q.stdout)
        assert len(trials) == 2 and {t["status"] for t in trials} == {"FINISHED"}, trials
        hosts_of = {p.pid: w.ns for w, p in zip((w1, w2), dask)}
        assert {hosts_of.get(int(t["pid"])) for t in trials} == {w1.ns, w2.ns}, (trials, {p.pid for p in dask})  # one on each host
    finally:
        for p in [*dask, sched]:
            p.terminate()
            try: p.wait(30)
            except subprocess.TimeoutExpired: p.kill()

TRIALS = """import json
from mlflow import MlflowClient
c = MlflowClient()
rs = c.search_runs([c.get_experiment_by_name("fruitflow").experiment_id], "tags.sweep = 'true'", max_results=1)
trials = c.search_runs([c.get_experiment_by_name("fruitflow").experiment_id], f"tags.mlflow.parentRunId = '{rs[0].info.run_id}'")
print(json.dumps([dict(status=t.info.status, pid=t.data.tags["process_id"]) for t in trials]))
"""
