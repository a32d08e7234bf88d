"""Shared, expensive fixtures: a real Prefect server, the lab's photos over HTTP, and pipeline runs.

Everything here is real: a `prefect server` process, `fruitflow` run as a subprocess with real papermill
kernels, an MLflow SQLite store, and an HTTP server on 127.0.0.1. Servers bind to free ports so parallel
CI jobs don't collide, and one pipeline run is shared by every test that only inspects it.

`tests/run` runs pytest with pytest-xdist's workers (`-n`, `--dist loadgroup`): the controlling process starts the
session's Prefect server once and the workers share it (`SHARED_PREFECT`); a run that several tests inspect is
made once for all workers (`across_workers`); a module whose tests share a module-scoped fixture is one
`xdist_group`, so that one worker runs it. Without `-n` everything works as in one process.
"""
from __future__ import annotations
import contextlib, fcntl, functools, http.server, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB_IMAGES = ROOT.parent/"shared"/"data"/"lab-images"
BIN = Path(sys.executable).parent
FAST = ["--epochs", "1", "--image-size", "32", "--batch-size", "4", "--model", "small"]  # tiny runs: the tests check plumbing, not accuracy (small: no 14 MB backbone to build and log)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def wait_http(url: str, timeout: float = 180, proc: subprocess.Popen|None = None) -> None:
    "Wait until `url` answers 200, failing early if `proc` died."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None: raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200: return
        except OSError: pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")

@contextlib.contextmanager
def server_process(cmd: list, health_url: str, log: Path, **popen):
    "Start a server process with its output in `log`, wait until `health_url` answers, stop it afterwards."
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        wait_http(health_url, 240, proc)
        yield proc
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()

SHARED_PREFECT = "FRUITFLOW_TEST_PREFECT_API"  # the API URL of the Prefect server the controlling process started for its workers
_shared_server: list = []  # (process, home) of that server, in the controlling process

def prefect_command(home: Path) -> tuple[list, dict, str]:
    "The command line, environment and API URL of a real Prefect server on a free loopback port, its home `home`."
    port = free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    return [BIN/"prefect", "server", "start", "--host", "127.0.0.1", "--port", port], env, f"http://127.0.0.1:{port}/api"

def pytest_configure(config):
    "Register the markers; under pytest-xdist the controlling process starts the session's Prefect server (workers wait for its health when a test needs it)."
    config.addinivalue_line("markers", "quick: needs no server and no pipeline run (`bash tests/run --quick`)")
    config.addinivalue_line("markers", "long: among the longest tests (a minute or more alone): started first, so that no worker is left with one at the end")
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None) or config.option.markexpr == "quick": return  # quick: no server
    home = Path(tempfile.mkdtemp(prefix="fruitflow-test-prefect-"))
    cmd, env, url = prefect_command(home)
    with open(home/"server.log", "w") as out:
        _shared_server.append((subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env), home))
    os.environ[SHARED_PREFECT] = url  # the workers inherit it

def pytest_collection_modifyitems(items):
    "The tests marked long first (pytest-xdist hands out work in this order, its groups of several tests before single ones)."
    items.sort(key=lambda item: item.get_closest_marker("long") is None)

def pytest_unconfigure(config):
    for proc, home in _shared_server:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()
        shutil.rmtree(home, ignore_errors=True)

@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    "A real Prefect server on a free loopback port, shared by the session (and by pytest-xdist's workers): its API URL."
    if url := os.environ.get(SHARED_PREFECT):
        wait_http(f"{url}/health", 240)
        yield url
        return
    home = tmp_path_factory.mktemp("prefect_home")
    cmd, env, url = prefect_command(home)
    with server_process(cmd, f"{url}/health", home/"server.log", env=env):
        yield url

def across_workers(tmp_path_factory, name: str, make):
    """`make(folder)` once for the whole session, also across pytest-xdist's workers: the first worker to ask makes it
    in a folder they all see, under a file lock, while the others wait; its result (JSON) for every worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"): return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # the session's, above each worker's own
    with open(root/f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (done := root/f"{name}.json").exists(): return json.loads(done.read_text())
        result = make(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
        done.write_text(json.dumps(result))
        return result

@pytest.fixture(scope="session")
def lab_site():
    "The lab's photos served over HTTP on 127.0.0.1 in the upstream layout (apples/, oranges/): the base URL."
    if not LAB_IMAGES.is_dir(): pytest.skip(f"{LAB_IMAGES} is missing")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(LAB_IMAGES))
    handler.func.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()

def fruitflow(*args, workdir: Path, env: dict|None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    "Run the `fruitflow` command in `workdir` and return its completed process (text output)."
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | (env or {})
    cmd = [str(BIN/"fruitflow"), *map(str, args)]
    with subprocess.Popen(cmd, cwd=workdir, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try: out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: ask it where it is (every thread's stack, `fruitflow.cli._stacks_on_signal`), then kill it
            p.send_signal(signal.SIGUSR1); time.sleep(3); p.kill()
            out, err = p.communicate()
            pytest.fail(f"`{' '.join(cmd[1:])}` still ran after {timeout} s; its output's end:\n{out[-3000:]}\nits threads:\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)

def with_handlers(cmd: list, handlers: dict) -> list:
    "`cmd` started with these signal dispositions (signal → SIG_DFL or SIG_IGN) whatever these tests inherited (a terminal's job, nohup's): set by a wrapper that then execs `cmd`, in the same process."
    return [sys.executable, "-c", "import json, os, signal, sys; [signal.signal(int(s), signal.Handlers(h)) for s, h in json.loads(sys.argv[1]).items()]; os.execv(sys.argv[2], sys.argv[2:])",
            json.dumps({int(k): int(v) for k, v in handlers.items()}), *map(str, cmd)]

def wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    "Read the process's output until `text` appears."
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None: break
        seen += line
        if text in line: return seen
    raise AssertionError(f"{text!r} never appeared:\n{seen}\n{proc.stderr.read() if proc.poll() is not None else ''}")

def mlflow_client(workdir: Path):
    "A client of the embedded store of `workdir`, for tracking and registry alike (whatever this process set globally)."
    from mlflow import MlflowClient
    uri = f"sqlite:///{Path(workdir).resolve()}/mlflow.db"
    return MlflowClient(uri, registry_uri=uri)

def runs(workdir: Path, experiment: str = "fruitflow"):
    "The MLflow runs of `experiment` in the embedded store of `workdir`, newest first."
    c = mlflow_client(workdir)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], order_by=["start_time DESC"]) if exp else []

SYNTHETIC_RUN = ["run", "--source", "synthetic", "--n-per-class", "8", *FAST[:-2]]  # --model auto: small on drawn photos

@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory, prefect_api):
    "One complete pipeline run on a small synthetic set, made once for all workers: (workdir, completed process, MLflow run)."
    assert FAST[-2:] == ["--model", "small"]
    def make(wd: Path) -> dict:
        p = fruitflow(*SYNTHETIC_RUN, workdir=wd, env={"PREFECT_API_URL": prefect_api})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return dict(workdir=str(wd), args=p.args, returncode=p.returncode, stdout=p.stdout, stderr=p.stderr)
    made = across_workers(tmp_path_factory, "synthetic", make)
    wd = Path(made["workdir"])
    return wd, subprocess.CompletedProcess(made["args"], made["returncode"], made["stdout"], made["stderr"]), runs(wd)[0]
