"""What marking `rfc3987_syntax` missing (fruitflow/__init__.py) saves each of a run's processes at import, side by side.

    python benchmarks/imports.py [--rounds 5]

jsonschema (through Prefect, nbformat and papermill) imports `rfc3987_syntax` when installed, which builds its
Earley parsers at import. For what each process of a run imports (the `fruitflow` command; the shared
kernel's step modules; Prefect's temporary server), a fresh Python process times the imports twice per round:
as fruitflow runs them, and with `import rfc3987_syntax` timed first (the baseline: what jsonschema does
without fruitflow's line; jsonschema then finds it loaded). The order alternates from round to round; prints
the medians and the difference.
"""
import argparse, statistics, subprocess, sys

SETS = {  # a process of a run: what it imports
    "fruitflow command": "import fruitflow.cli, fruitflow.flow, fruitflow.tracking",
    "shared kernel": "import fruitflow.core, mlflow, scrapbook, papermill",
    "Prefect's server": "import fruitflow.servers, prefect.server.api.server",
}
TIMED = "import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
SIDES = {"fruitflow": "", "baseline": "import rfc3987_syntax; "}

def seconds(code: str) -> float:
    "Seconds a fresh process takes to run `code`'s imports (Python's own start not counted)."
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    for name, code in SETS.items():
        got = {k: [] for k in SIDES}
        for i in range(a.rounds):
            for side in (list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]):
                got[side].append(seconds(TIMED.format(code=SIDES[side] + code)))
        ours, base = statistics.median(got["fruitflow"]), statistics.median(got["baseline"])
        print(f"{name:>18}: {ours:.2f} s against {base:.2f} s ({base - ours:.2f} s less; {ours / base:.2f}x), medians of {a.rounds} alternated rounds", flush=True)
