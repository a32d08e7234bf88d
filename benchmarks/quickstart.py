"""Issue 43's budget: the Quick start's `fruitflow run` (embedded defaults, a fresh work folder, offline) of this
checkout against another one, side by side.

    python benchmarks/quickstart.py --baseline /path/to/other/checkout [--pairs 4] [--json PATH]

Each side is `fruitflow run` with no option in a fresh work folder, one subprocess timed from the outside, with
MLFLOW_* and PREFECT_* removed from its environment; the baseline side runs the other checkout's package through
PYTHONPATH (make one with `git worktree add /tmp/base <commit>`). Where the lab's photos are unreachable, as on
these machines, both draw the same synthetic set. One unrecorded run of each side first fills the shared caches
(drawn photos, compiled bytecode); then the pairs alternate their order (pair 1: this, baseline; pair 2:
baseline, this; ...). Prints each run, the medians and their ratio, the per-step seconds from the "[i/5] step
done in X s" lines, and how each run ended (its registered alias). A measurement, not a test: run it twice.
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS = ("download", "preprocess", "train", "evaluate", "register")

def run(pythonpath: str = "") -> dict:
    "One Quick-start run in a fresh folder: wall seconds, per-step seconds, the alias it registered."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    if pythonpath: env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory(prefix="quickstart-") as wd:
        t0 = time.perf_counter()
        p = subprocess.run([str(BIN/"fruitflow"), "run"], cwd=wd, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
    if p.returncode: raise SystemExit(f"fruitflow run failed ({'baseline' if pythonpath else 'this'}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    steps = {s: float(m[1]) for s in STEPS if (m := re.search(rf"\] {s} done in ([\d.]+) s", p.stdout))}
    alias = (re.findall(r"registered \S+ version \d+ as @(\w+)", p.stdout) or ["?"])[-1]
    return dict(wall=wall, steps=steps, alias=alias)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="another checkout of fruitflow (its package runs through PYTHONPATH)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--json", default="", help="write every run's figures here")
    a = ap.parse_args()
    sides = {"this": "", "baseline": str(Path(a.baseline).resolve())}
    for name, pp in sides.items(): run(pp); print(f"warm-up run of {name} done", flush=True)
    got = {n: [] for n in sides}
    for i in range(a.pairs):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            got[name].append(r := run(sides[name]))
            print(f"pair {i + 1} {name:8} {r['wall']:6.1f} s  " + "  ".join(f"{s} {r['steps'].get(s, 0):.1f}" for s in STEPS) + f"  @{r['alias']}", flush=True)
    med = {n: statistics.median(r["wall"] for r in rs) for n, rs in got.items()}
    for n, rs in got.items():
        print(f"{n:8} median {med[n]:.1f} s; steps " + "  ".join(f"{s} {statistics.median(r['steps'].get(s, 0) for r in rs):.1f}" for s in STEPS))
    print(f"this / baseline = {med['this'] / med['baseline']:.2f} (budget 1.20); per pair: "
          + ", ".join(f"{t['wall'] / b['wall']:.2f}" for t, b in zip(got["this"], got["baseline"])))
    if a.json: Path(a.json).write_text(json.dumps(got, indent=1))

if __name__ == "__main__": main()
