"""What `fruitflow`'s `gc.freeze()` at exit saves: a whole run, and the time from its last line to its exit, side by side.

    python benchmarks/cli_exit.py [--pairs 3] [--source synthetic]

Each pair runs `fruitflow run --source synthetic --epochs 1 --image-size 32` twice, cold (a fresh work folder:
Prefect's temporary server, a new MLflow store), in the clean environment of `pipeline.py`: once as the command
runs (`fruitflow.cli.main`, which registers `gc.freeze` to run at exit), once with `gc.freeze` replaced by a
function that does nothing (the baseline: the interpreter's exit sweeps every object the `fruitflow` process
made). The order alternates from pair to pair. Prints, per side, the median run and the median "tail", the
seconds from the run's last line to the process's exit.
"""
import argparse, statistics, subprocess, sys, tempfile, time
from pathlib import Path
from pipeline import clean_env

MAIN = "import sys; from fruitflow.cli import main; sys.exit(main(sys.argv[1:]))"
SIDES = {"freeze": MAIN, "no freeze": "import gc; gc.freeze = lambda: None; " + MAIN}

def one(code: str, source: str) -> tuple[float, float]:
    "One cold run: its seconds, and the seconds from its last line of output to its exit."
    work = Path(tempfile.mkdtemp(prefix="fruitflow-exit-"))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, "run", "--source", source, "--epochs", "1", "--image-size", "32"], cwd=work,
                         env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    last = t0
    for _ in p.stdout: last = time.perf_counter()
    if p.wait(): sys.exit(f"the run in {work} failed ({p.returncode})")
    end = time.perf_counter()
    return end - t0, end - last

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--source", default="synthetic")
    a = ap.parse_args()
    got = {k: [] for k in SIDES}
    for i in range(a.pairs):
        for side in (list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]):
            got[side].append(one(SIDES[side], a.source))
            print(f"pair {i + 1} {side:>9}: run {got[side][-1][0]:.1f} s, last line to exit {got[side][-1][1]:.2f} s", flush=True)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v)) for k, v in got.items()}
    for k, (r, t) in med.items(): print(f"median {k:>9}: run {r:.1f} s, last line to exit {t:.2f} s")
    print(f"freeze / no freeze: run {med['freeze'][0] / med['no freeze'][0]:.2f}x, tail {med['freeze'][1] / med['no freeze'][1]:.2f}x"
          f" ({med['no freeze'][1] - med['freeze'][1]:.2f} s less)")
