"""Wall time of fruitflow's whole pipeline (Prefect + papermill + MLflow) against the lab notebook's code run as one plain Python script.

    python benchmarks/pipeline.py [--epochs 10] [--repeat 1] [--images DIR]

Issue 6, benchmark 1. All sides get the same images, the lab's 19 photos (`DIR`, default
../shared/data/lab-images), served over HTTP on 127.0.0.1 by a thread of this script in the upstream layout
(apples/, oranges/), and the same epochs. Each side is one subprocess timed from the outside, as a user runs it:

  (a) `python benchmarks/lab_script.py`: the lab's workflow (150 px, batch 8, its model), no Prefect, no MLflow,
      run first and last in each repeat; (a) is the mean of the two (one run of it alone took 13.4 to 19.5 s within
      an hour here, so one run is a poor baseline);
  (f) `fruitflow run --source github` from cold on the embedded defaults, the first time on this machine: a fresh
      work folder, so Prefect's temporary server starts on a fresh `prefect_home` and MLflow writes a new SQLite
      store, and an empty fruitflow cache (`FRUITFLOW_CACHE`, this script's own), so that server migrates its database;
  (b) right after (f), the same from cold in another fresh work folder, with the cache (f) filled: Prefect's server
      starts from the migrated database (f) kept, as every cold run after a machine's first does;
  (g) right after (b), the same as (b) with `--kernel-per-step`: a kernel of its own for each step, each started
      ahead, as fruitflow ran before the steps shared one; (b)/(g) is what sharing the kernel saves from cold;
  (c) the same `fruitflow run` with the servers already up (the lab's way of working): `fruitflow up` on free
      ports before the clock starts, and until its keeper offers its warm kernel and its warm driver is ready
      (both times are printed, not counted), `fruitflow down` after;
  (h) right after (c), once the keeper has warmed a kernel again, with the warm driver stopped: the run in a
      process of its own, which imports Prefect and MLflow itself; (c)/(h) is what the warm driver saves;
  (d) right after (h), with the keeper stopped too: the kernel the steps share started (and their modules
      imported) ahead by the run itself; (h)/(d) is what the warm kernel saves;
  (e) right after (d): `fruitflow run --kernels-ahead 0`, each step's kernel started when the step starts,
      fruitflow's first way; (d)/(e) is what starting a kernel ahead saves (any advantage of running later
      goes to (d) and (e)).

MLFLOW_* and PREFECT_* are removed from every subprocess's environment, so (b) uses the embedded defaults and
(c), (h), (d) and (e) find the servers only through `fruitflow up`'s pid files. (f), (b) and (g) share a fruitflow
cache of their own (`FRUITFLOW_CACHE`), empty before (f); (c), (h), (d) and (e) use this machine's, as a user's runs
do: the synthetic photos train mixes in are drawn by the first run that needs them and read back by the next. Every side downloads the images afresh: the lab
script wipes its dataset/, (b) has a fresh folder, data/ is removed before each of (c), (h), (d) and (e). fruitflow runs its
defaults (96 px, batch 8, the `small` model, which trains at least 200 steps whatever the set's size; the
lab's model trains 2 steps an epoch), so "same epochs" is not "same training work": `--model lab` narrows that.
Per-step times of (f), (b) to (h) come from their "[i/5] step done in X s" lines; "outside steps" is everything
else (interpreter and Prefect start-up, opening the MLflow run). Targets: (b)/(a) ≤ 1.0, (c)/(a) ≤ 0.5.
The sides run one after another, (a), (f), (b), (g), then (c), (h), (d), (e), then (a) again, in each repeat. A measurement, not a test: run it twice.
"""
import argparse, contextlib, functools, http.server, os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS = ("download", "preprocess", "train", "evaluate", "register")
TARGETS = {"cold": 1.0, "up": 0.5}  # issue 6: most pipeline time as a fraction of the lab script's

def clean_env() -> dict:
    "This environment without MLFLOW_*/PREFECT_*, as tests/conftest.py's `fruitflow()` gives its subprocesses."
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}

def free_port() -> int:
    "A free port on the loopback address (the default 8080/5000 may be someone else's)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@contextlib.contextmanager
def lab_site(folder: Path):
    "Serve `folder` over HTTP on 127.0.0.1 from a thread: the base URL."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.func.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try: yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally: srv.shutdown()

def timed(cmd: list, cwd: Path, check: bool = True, env: dict|None = None) -> tuple[float, str]:
    "Run `cmd` in `cwd` with the clean environment (and `env`): its wall time and stdout; exit with its output's tail if it fails (and `check`)."
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env() | (env or {}), capture_output=True, text=True)
    s = time.perf_counter() - t
    if p.returncode and check: sys.exit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return s, p.stdout

def step_times(out: str) -> dict:
    "Each step's seconds from fruitflow's progress lines."
    return {m[0]: float(m[1]) for m in re.findall(r"\[\d/\d\] (\w+) done in ([\d.]+) s", out)}

def lab(base: str, work: Path, a) -> dict:
    "(a) The lab's workflow as a plain script, a fresh interpreter."
    work.mkdir(parents=True)
    s, _ = timed([sys.executable, ROOT/"benchmarks"/"lab_script.py", "--base-url", base, "--epochs", a.epochs, "--workdir", work], work)
    return dict(total=s, steps={})

def run(base: str, work: Path, a, *more, env: dict|None = None) -> dict:
    "`fruitflow run` on the lab's photos in `work` (and `more` options, `env`): total and per-step seconds."
    work.mkdir(parents=True, exist_ok=True)
    s, out = timed([BIN/"fruitflow", "run", "--source", "github", "--base-url", base, "--epochs", a.epochs,
                    "--model", a.model, "--workdir", work, *more], work, env=env)
    return dict(total=s, steps=step_times(out))

def warm(work: Path, timeout: float = 300, driver: bool = True) -> float:
    "Wait until `fruitflow up`'s keeper offers its warm kernel, the one the steps share, and (`driver`) its warm driver is ready: the seconds it took."
    t = time.perf_counter()
    while not re.search(rf"warm: {','.join(STEPS)} " + ("(.|\n)*driver .* ready " if driver else ""), timed([BIN/"fruitflow", "status", "--workdir", work], work, check=False)[1]):
        if time.perf_counter() - t > timeout: sys.exit(f"the keeper offered no warm kernel or the driver was not ready within {timeout} s: see {work}/.fruitflow/")
        time.sleep(1)
    return time.perf_counter() - t

def stop(work: Path, name: str):
    "Stop `fruitflow up`'s keeper (and the kernels it offers) or its driver, leaving the servers up."
    from fruitflow.servers import _pidfile, _stop, running
    if k := running(work, (name,)).get(name): _stop(k); _pidfile(work, name).unlink(missing_ok=True)

def with_servers(base: str, work: Path, a) -> tuple[dict, dict, dict, dict]:
    "(c), (h), (d) then (e): `fruitflow run` while `fruitflow up` serves Prefect and MLflow over `work`; up, the warming and down are not timed."
    work.mkdir(parents=True, exist_ok=True)
    up_s, _ = timed([BIN/"fruitflow", "up", "--prefect-port", free_port(), "--mlflow-port", free_port(), "--workdir", work], work)
    try:
        got, warm_s = [], warm(work)
        for more in ((), "no driver", "no keeper", ("--kernels-ahead", "0")):
            if more == "no driver": stop(work, "driver"); warm(work, driver=False); more = ()
            if more == "no keeper": stop(work, "kernels"); more = ()
            shutil.rmtree(work/"data", ignore_errors=True)  # download afresh, like the other sides
            got.append(run(base, work, a, *more) | dict(up=up_s, warm=warm_s))
        return tuple(got)
    finally: timed([BIN/"fruitflow", "down", "--workdir", work], work)

def table(r: dict) -> str:
    "One repeat's figures: per-step and total seconds of each side, ratios to the lab script against the targets."
    cols = (("first", 12), ("cold", 12), ("up", 16), ("upd", 14), ("upk", 14), ("up0", 14), ("cold1", 16))
    rows = [f"{'':<16}{'(a) lab script':>16}{'(f) first':>12}{'(b) cold':>12}{'(c) servers up':>16}{'(h) no driver':>14}{'(d) no warm':>14}{'(e) ahead 0':>14}{'(g) per step':>16}"]
    for s in STEPS: rows.append(f"{s:<16}{'':>16}" + "".join(f"{r[k]['steps'].get(s, float('nan')):>{w}.1f}" for k, w in cols))
    rows.append(f"{'outside steps':<16}{'':>16}" + "".join(f"{r[k]['total'] - sum(r[k]['steps'].values()):>{w}.1f}" for k, w in cols))
    rows.append(f"{'total s':<16}{r['lab']['total']:>16.1f}" + "".join(f"{r[k]['total']:>{w}.1f}" for k, w in cols))
    rows.append(f"{'ratio to (a)':<16}{1:>16.2f}" + "".join(f"{r[k]['total'] / r['lab']['total']:>{w}.2f}" for k, w in cols))
    rows.append(f"{'target':<16}{'':>16}{'':>12}{'≤ ' + str(TARGETS['cold']):>12}{'≤ ' + str(TARGETS['up']):>16}")
    rows.append(f"(a): the mean of the lab script's first and last run of this repeat, {' and '.join(f'{t:.1f}' for t in r['lab']['runs'])} s")
    rows.append(f"(b) / (f): {r['cold']['total'] / r['first']['total']:.2f}, a cold run with Prefect's migrated database kept against the machine's first")
    rows.append(f"(b) / (g): {r['cold']['total'] / r['cold1']['total']:.2f}, from cold, one kernel the steps share against a kernel per step")
    rows.append(f"(c) / (h): {r['up']['total'] / r['upd']['total']:.2f}, the run forked by `fruitflow up`'s warm driver against a process of its own")
    rows.append(f"(h) / (d): {r['upd']['total'] / r['upk']['total']:.2f}, the warm kernel kept by `fruitflow up` against the kernel the run starts ahead")
    rows.append(f"(d) / (e): {r['upk']['total'] / r['up0']['total']:.2f}, a kernel started ahead against each step's kernel started with its step")
    rows.append(f"(`fruitflow up` took {r['up']['up']:.1f} s and its keeper {r['up']['warm']:.1f} s more to warm its kernel, before (c), not counted)")
    return "\n".join(rows)

def verdict(rs: list) -> str:
    "The median ratios of all repeats against the targets."
    lines = []
    for k, name in (("first", "(f) cold, the machine's first run"), ("cold", "(b) cold, embedded defaults"), ("up", "(c) servers already up"), ("upd", "(h) servers up, no warm driver"), ("upk", "(d) servers up, no warm kernels"), ("up0", "(e) servers up, --kernels-ahead 0"), ("cold1", "(g) cold, --kernel-per-step")):
        q = statistics.median(r[k]["total"] / r["lab"]["total"] for r in rs)
        lines.append(f"{name}: {q:.2f}× the lab script" + (f" (target ≤ {TARGETS[k]}×): {'met' if q <= TARGETS[k] else 'NOT met'}" if k in TARGETS else ""))
    return "\n".join(lines)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="epochs of every side (default 10, the lab's)")
    ap.add_argument("--repeat", type=int, default=1, help="times to run the three sides (default 1)")
    ap.add_argument("--model", default="small", help="fruitflow's model: small (its default) or lab")
    ap.add_argument("--images", type=Path, default=ROOT.parent/"shared"/"data"/"lab-images", help="the lab's photos, apples/ and oranges/")
    a = ap.parse_args()
    if not (a.images/"apples").is_dir(): sys.exit(f"{a.images}/apples is missing: pass --images")
    root, rs = Path(tempfile.mkdtemp(prefix="fruitflow-bench-")), []
    with lab_site(a.images) as base:
        for i in range(a.repeat):
            cache = {"FRUITFLOW_CACHE": str(root/f"cache{i}")}  # empty for (f), which fills it for (b)
            labs = [lab(base, root/f"lab{i}", a)["total"]]
            r = dict(first=run(base, root/f"first{i}", a, env=cache), cold=run(base, root/f"cold{i}", a, env=cache),
                     cold1=run(base, root/f"cold1-{i}", a, "--kernel-per-step", env=cache))
            r["up"], r["upd"], r["upk"], r["up0"] = with_servers(base, root/f"up{i}", a)
            labs.append(lab(base, root/f"lab{i}-last", a)["total"])
            r["lab"] = dict(total=statistics.mean(labs), runs=labs)
            rs.append(r)
            print(f"\nrepeat {i + 1}/{a.repeat}: {a.epochs} epochs, the lab's photos from {a.images}, fruitflow --model {a.model}\n{table(r)}", flush=True)
    print(f"\n{verdict(rs)}\n(work folders in {root})")
