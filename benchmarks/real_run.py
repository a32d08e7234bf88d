"""One whole `fruitflow run` on a large real source: its wall time, each step's time and the peak memory of its processes.

    python benchmarks/real_run.py [--source ../shared/data/real-photos] [-- run options]

Runs `fruitflow run --source SOURCE` cold (a fresh work folder, no servers: a temporary Prefect server, a new
MLflow store) as a user would, with MLFLOW_*/PREFECT_* removed from its environment. Every 0.2 s it adds up the
resident memory of the run's whole process tree (the CLI, its kernel, Prefect's temporary server) and keeps
the peak; it also keeps the largest single process. Per-step seconds come from the "[i/5] step done in X s"
lines. A measurement, not a test.
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
import psutil

ROOT = Path(__file__).resolve().parent.parent

def watch(pid: int, peaks: dict, stop: threading.Event):
    "Keep in `peaks` the largest sum of RSS over `pid` and its descendants, and the largest one process, until `stop`."
    while not stop.is_set():
        try:
            procs = [psutil.Process(pid)]; procs += procs[0].children(recursive=True)
            rss = [p.memory_info().rss for p in procs if p.is_running()]
            peaks["tree"], peaks["one"] = max(peaks["tree"], sum(rss)), max(peaks["one"], max(rss))
        except psutil.Error: pass
        stop.wait(0.2)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(ROOT.parent/"shared"/"data"/"real-photos"))
    ap.add_argument("run_args", nargs="*", help="more options of the run, after --")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fruitflow-real-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "FRUITFLOW_"))}
    cmd = [str(Path(sys.executable).parent/"fruitflow"), "run", "--source", a.source, *a.run_args]
    peaks, stop, t = {"tree": 0, "one": 0}, threading.Event(), time.perf_counter()
    p = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=watch, args=(p.pid, peaks, stop), daemon=True).start()
    out = p.stdout.read(); rc = p.wait(); wall = time.perf_counter() - t; stop.set()
    if rc: sys.exit(f"fruitflow run exited with {rc}:\n{out[-3000:]}")
    steps = dict(re.findall(r"\[\d/5\] (\w+) done in ([\d.]+) s", out))
    print(f"fruitflow run --source {a.source} {' '.join(a.run_args)}: {wall:.1f} s in all; "
          + ", ".join(f"{k} {v} s" for k, v in steps.items()) + f"; outside the steps {wall - sum(map(float, steps.values())):.1f} s")
    print(f"peak memory: {peaks['tree'] / 2**20:,.0f} MB for all its processes together, {peaks['one'] / 2**20:,.0f} MB for the largest one")
    print(next((l for l in out.splitlines() if "images of" in l), "").strip())
    print(out.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
