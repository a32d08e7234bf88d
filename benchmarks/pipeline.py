"""Issue 24's speed budget: wall time of `fruitflow run` against the lab notebook's code run as one plain Python script.

    python benchmarks/pipeline.py [--epochs 10] [--pairs 3] [--images DIR] [--model efficientnet] [--cold-warm] [--keep] [--json PATH]

Every side gets the same images, the lab's photos (`DIR`, default ../shared/data/lab-images), served over HTTP
on 127.0.0.1 by a thread of this script in the upstream layout (apples/, oranges/), and the same epochs. Each side
is one subprocess timed from the outside, as a user runs it, with MLFLOW_* and PREFECT_* removed from its
environment, and each downloads the images afresh:

  (a) lab script: `python benchmarks/lab_script.py` in a fresh work folder (the lab's 150 px, batch 8, its model);
  (b) cold: `fruitflow run --source github` in a fresh work folder on the embedded defaults, no servers: the run
      starts its own temporary Prefect server and MLflow writes a fresh SQLite store;
  (c) servers up: the same `fruitflow run` over one work folder U where `fruitflow up` (free ports, run once before
      the pairs; its time is printed, not counted) serves Prefect and MLflow; U/data is removed before each run.
      The first run right after `up` counts like any other (no warm-up run); `fruitflow down` ends it. `up` keeps a
      warm kernel for the next run (fruitflow.warm); once a run has taken it, the keeper warms the next one, and
      every side waits for that before it starts, so that no side shares the cores with it;
  (d) with --cold-warm: as (c) over a second work folder whose `fruitflow up --no-warm-kernel` keeps none: what
      the warm kernel saves, side by side.

The sides run in pairs (rounds of one run each), alternating their order to spread slow spells and any advantage
of running later: pair 1 a, b, c; pair 2 c, b, a; pair 3 a, b, c; ... Per-step seconds come from fruitflow's
"[i/5] step done in X s" lines; "outside" is the rest (interpreter and Prefect start-up, the MLflow run).
fruitflow runs its defaults (96 px, batch 8, `--model efficientnet`: a frozen pretrained backbone and a new head),
so "same epochs" is not "same training work": `--model small` (a CNN of the lab's size) or `--model lab` (the
lab's own) narrow that. The budget, on the medians: (c)/(a) <= 0.8 (hard floor 1.0), (b)/(a) <= 1.2 (hard
floor 1.3). This is a measurement, not a test: the machine has slow spells, so read the per-pair ratios too,
and run it again before believing one verdict.
"""
import argparse, contextlib, functools, http.server, json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS = ("download", "preprocess", "train", "evaluate", "register")
SIDES = {"a": "lab script", "b": "cold", "c": "servers up", "d": "servers up, no warm kernel"}
BUDGET = {"b": (1.2, 1.3), "c": (0.8, 1.0)}  # side: (budget, hard floor) of its median over the lab script's

def clean_env() -> dict:
    "This environment without MLFLOW_*/PREFECT_*, as tests/conftest.py's `fruitflow()` gives its subprocesses."
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}

def free_ports(n: int) -> list[int]:
    "`n` distinct free ports on the loopback address (the default 8080/5000 may be someone else's)."
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks: s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]

@contextlib.contextmanager
def lab_site(folder: Path):
    "Serve `folder` over HTTP on 127.0.0.1 from a thread: the base URL."
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.func.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try: yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally: srv.shutdown()

def timed(cmd: list, cwd: Path, check: bool = True) -> tuple[float, str]:
    "Run `cmd` in `cwd` with the clean environment: its wall time and stdout; exit with its output's tail if it fails (and `check`)."
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True)
    s = time.perf_counter() - t
    if p.returncode and check: sys.exit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return s, p.stdout

def step_times(out: str) -> dict:
    "Each step's seconds from fruitflow's progress lines."
    return {m[0]: float(m[1]) for m in re.findall(r"\[\d/\d\] (\w+) done in ([\d.]+) s", out)}

def settle(up_work: Path, timeout: float = 300) -> float:
    "Wait until the keeper of `up_work` offers a warm kernel (it warms the next one after each run): the seconds waited."
    t, f = time.perf_counter(), up_work/".fruitflow"/"warm-kernel.json"
    while not f.exists() and time.perf_counter() - t < timeout: time.sleep(0.2)
    return time.perf_counter() - t

def measure(side: str, pair: int, base: str, root: Path, up_work: Path, a) -> dict:
    "One timed run of `side` in pair `pair`: its seconds and per-step seconds."
    settle(root/"up")
    if side in "cd":
        work = up_work
        shutil.rmtree(work/"data", ignore_errors=True)  # download afresh, like the other sides
    else:
        work = root/f"{side}{pair}"
        work.mkdir(parents=True)
    if side == "a": cmd = [sys.executable, ROOT/"benchmarks"/"lab_script.py", "--base-url", base, "--epochs", a.epochs, "--workdir", work]
    else: cmd = [BIN/"fruitflow", "run", "--source", "github", "--base-url", base, "--epochs", a.epochs, "--model", a.model, "--workdir", work]
    s, out = timed(cmd, work)
    return dict(side=side, pair=pair, seconds=s, steps=step_times(out) if side != "a" else {})

def show(m: dict) -> str:
    "One measurement as a line."
    steps = ", ".join(f"{k} {v:.1f}" for k, v in m["steps"].items())
    outside = f", outside {m['seconds'] - sum(m['steps'].values()):.1f}" if m["steps"] else ""
    return f"({m['side']}) {SIDES[m['side']]:<10} pair {m['pair']}: {m['seconds']:6.1f} s" + (f"  [{steps}{outside}]" if steps else "")

def verdict(q: float, budget: float, floor: float) -> str:
    return "within budget" if q <= budget else "within hard floor only" if q <= floor else "over"

def summary(ms: list, pairs: int, sides: str) -> tuple[str, dict]:
    "Medians, ratios to the lab script (of the medians and per pair) and the verdicts: the text and its figures."
    secs = {s: [m["seconds"] for m in ms if m["side"] == s] for s in sides}
    med = {s: statistics.median(v) for s, v in secs.items()}
    by = {(m["side"], m["pair"]): m["seconds"] for m in ms}
    lines, got = [f"\nmedians over {pairs} pair(s): " + ", ".join(f"({s}) {SIDES[s]} {med[s]:.1f} s" for s in sides)], {"median_s": med}
    if "d" in sides:
        per = [by["d", p] - by["c", p] for p in range(1, pairs + 1)]
        got["d-c"] = dict(of_medians=med["d"] - med["c"], per_pair=per)
        lines.append(f"the warm kernel saves {med['d'] - med['c']:.1f} s a run (medians; per pair {', '.join(f'{x:.1f}' for x in per)})")
    for s, (budget, floor) in BUDGET.items():
        q = med[s] / med["a"]
        per = [by[s, p] / by["a", p] for p in range(1, pairs + 1)]
        v = verdict(q, budget, floor)
        got[f"{s}/a"] = dict(of_medians=q, per_pair=per, budget=budget, hard_floor=floor, verdict=v)
        lines.append(f"({s})/(a) {SIDES[s]}: {q:.2f}x of the medians (budget <= {budget}, hard floor {floor}): {v};"
                     f" per pair {', '.join(f'{r:.2f}' for r in per)}")
    worst = max(("within budget", "within hard floor only", "over").index(got[f"{s}/a"]["verdict"]) for s in BUDGET)
    got["verdict"] = ("within budget", "within hard floor only", "over")[worst]
    lines.append(f"speed budget: {got['verdict']}")
    return "\n".join(lines), got

def main(a) -> None:
    if not (a.images/"apples").is_dir(): sys.exit(f"{a.images}/apples is missing: pass --images")
    if a.pairs < 1: sys.exit("--pairs must be at least 1")
    root, ms = Path(tempfile.mkdtemp(prefix="fruitflow-bench-")), []
    sides = "abcd" if a.cold_warm else "abc"
    ups = {"c": root/"up", "d": root/"up-no-warm-kernel"} if a.cold_warm else {"c": root/"up"}
    print(f"{a.epochs} epochs, the lab's photos from {a.images}, fruitflow --model {a.model}, {a.pairs} pair(s), in {root}", flush=True)
    try:
        with lab_site(a.images) as base:
            for side, work in ups.items():
                work.mkdir()
                prefect, mlflow = free_ports(2)
                up_s, _ = timed([BIN/"fruitflow", "up", "--prefect-port", prefect, "--mlflow-port", mlflow, "--workdir", work,
                                 *(["--no-warm-kernel"] if side == "d" else [])], work)
                print(f"fruitflow up ({side}) took {up_s:.1f} s (not counted)", flush=True)
            try:
                for pair in range(1, a.pairs + 1):
                    for side in (sides if pair % 2 else sides[::-1]):
                        ms.append(measure(side, pair, base, root, ups.get(side, root), a))
                        print(show(ms[-1]), flush=True)
            finally:
                for work in ups.values(): timed([BIN/"fruitflow", "down", "--workdir", work], work, check=False)
        text, got = summary(ms, a.pairs, sides)
        print(text)
        if a.json:
            a.json.write_text(json.dumps(dict(epochs=a.epochs, pairs=a.pairs, model=a.model, images=str(a.images),
                                              up_seconds=up_s, measurements=ms, summary=got), indent=2))
            print(f"measurements written to {a.json}")
    finally:
        if a.keep: print(f"work folders kept in {root}")
        else: shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="epochs of every side (default 10, the lab's)")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the three sides, order alternating (default 3)")
    ap.add_argument("--images", type=Path, default=ROOT.parent/"shared"/"data"/"lab-images", help="the lab's photos, apples/ and oranges/")
    ap.add_argument("--model", default="efficientnet", help="fruitflow's model: efficientnet (its default), small or lab")
    ap.add_argument("--cold-warm", action="store_true", help="add side (d): servers up without the warm kernel")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folders (default: removed at the end)")
    ap.add_argument("--json", type=Path, help="also write every measurement and the summary to this JSON file")
    main(ap.parse_args())
