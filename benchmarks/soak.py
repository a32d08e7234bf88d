"""Many `fruitflow run`s in a row on one store: every run FINISHED, registry versions 1..N in order, nothing left growing.

    python benchmarks/soak.py [--runs 20] [--workdir /tmp/soak] [-- run options]

Each run is a real `fruitflow run` (by default synthetic, 6 images a class, 1 epoch, 32 px) in the same work
folder, so on the same MLflow store. After each it records the exit code, the time, the MLflow run's status,
the version it registered, the processes left running from the work folder (kernels, servers: there should be
none), and, when PREFECT_API_URL names a server on this machine, that server's open files. It prints one line a
run and a verdict, and exits 1 if anything is wrong. `tests/test_soak.py` runs it for 3 runs.
"""
from __future__ import annotations
import argparse, os, subprocess, sys, time
from pathlib import Path

RUN = ["--source", "synthetic", "--n-per-class", "6", "--epochs", "1", "--image-size", "32", "--batch-size", "4"]

def _left(workdir: Path) -> list[str]:
    "Processes whose working folder or command line is in `workdir`: what a finished run should not leave."
    import psutil
    wd, out = str(Path(workdir).resolve()), []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.pid != os.getpid() and ((p.info["cwd"] or "").startswith(wd) or any(wd in a for a in p.info["cmdline"] or [])):
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (psutil.AccessDenied, psutil.NoSuchProcess): pass
    return out

def _server_files(api_url: str) -> int:
    "Open files of the local process listening on the port of `api_url` (-1 if not found)."
    import psutil
    if not api_url: return -1
    port = int(api_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    for p in psutil.process_iter():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")): return p.num_fds()
        except (psutil.AccessDenied, psutil.NoSuchProcess): pass
    return -1

def soak(runs: int,  # how many runs
         workdir: Path,  # their work folder, one store
         args: list[str] = RUN,  # options of each run
         env: dict|None = None,  # its environment (None: this one, less MLFLOW_*)
        ) -> list[dict]:
    "Run `fruitflow run` `runs` times in `workdir`: one record per run (rc, seconds, status, version, left, files)."
    from mlflow import MlflowClient
    exe = Path(sys.executable).parent/"fruitflow"
    env = env if env is not None else {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    uri, out = f"sqlite:///{Path(workdir).resolve()}/mlflow.db", []
    Path(workdir).mkdir(parents=True, exist_ok=True)
    for i in range(1, runs + 1):
        t0 = time.monotonic()
        p = subprocess.run([str(exe), "run", *args], cwd=workdir, env=env, capture_output=True, text=True)
        secs, c = time.monotonic() - t0, MlflowClient(uri, registry_uri=uri)
        exp = c.get_experiment_by_name("fruitflow")
        last = c.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0] if exp else None
        out.append(dict(run=i, rc=p.returncode, seconds=secs, status=last.info.status if last else "", run_id=last.info.run_id if last else "",
                        version=int(last.data.tags.get("registered_version", 0)) if last else 0, left=_left(workdir),
                        files=_server_files(env.get("PREFECT_API_URL", "")), error=p.stderr.strip().splitlines()[-1:] if p.returncode else []))
    return out

def problems(records: list[dict], workdir: Path) -> list[str]:
    "What is wrong with a soak: a failed run, a registry out of order, processes left, the Prefect server's files growing."
    from mlflow import MlflowClient
    uri = f"sqlite:///{Path(workdir).resolve()}/mlflow.db"
    bad = [f"run {r['run']}: exit code {r['rc']}, {r['status']} {r['error']}" for r in records if r["rc"] or r["status"] != "FINISHED"]
    versions = sorted(MlflowClient(uri, registry_uri=uri).search_model_versions("name='fruitflow'"), key=lambda v: int(v.version))
    if [int(v.version) for v in versions] != list(range(1, len(records) + 1)) or [r["version"] for r in records] != [int(v.version) for v in versions]:
        bad.append(f"registry versions {[int(v.version) for v in versions]}, the runs registered {[r['version'] for r in records]}")
    elif [v.run_id for v in versions] != [r["run_id"] for r in records]: bad.append("a version's run is not the run that registered it")
    bad += [f"run {r['run']} left {r['left']}" for r in records if r["left"]]
    files = [r["files"] for r in records if r["files"] >= 0]
    if len(files) > 1 and files[-1] > files[0] + 25: bad.append(f"the Prefect server's open files grew from {files[0]} to {files[-1]}")
    return bad

def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--runs", type=int, default=20)
    a.add_argument("--workdir", type=Path, default=Path("soak"))
    a.add_argument("run_args", nargs="*", help="options of each run, after --")
    args = a.parse_args()
    records = soak(args.runs, args.workdir, args.run_args or RUN)
    for r in records: print(f"run {r['run']:3}: exit {r['rc']}, {r['status']:9} version {r['version']:3}, {r['seconds']:6.1f} s, "
                            f"{len(r['left'])} processes left, Prefect server files {r['files']}")
    bad = problems(records, args.workdir)
    print("\n".join(bad) if bad else f"{len(records)} runs, all FINISHED, versions 1..{len(records)} in order, nothing left behind")
    sys.exit(1 if bad else 0)

if __name__ == "__main__": main()
