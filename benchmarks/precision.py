"""What `train(precision=...)` costs EfficientNet-Lite0 on the lab's photos: bfloat16 against float32, side by side.

    python benchmarks/precision.py [--pairs 3] [--images DIR] [--kind efficientnet]

The lab's photos (`DIR`, default ../shared/data/lab-images) are preprocessed once, as the pipeline does (96 px,
seed 42). Then each pair trains twice, each time in a fresh Python process that has imported TensorFlow and run
`train.warm_up()` as the warm kernel has, so what is timed is a run's one `train` call: bfloat16 then float32, and
the other way round in the next pair. On a CPU without native bfloat16 it emulates it: read the line it prints.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE = """import json, sys, time
from fruitflow import train as T
T.warm_up()
t = time.perf_counter()
r = T.train(sys.argv[1], sys.argv[2], sys.argv[3], epochs=10, batch_size=8, seed=42, precision=sys.argv[4])
print(json.dumps(dict(seconds=time.perf_counter() - t, val_loss=r.get("val_loss"), precision=r["precision"])))
"""

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--images", type=Path, default=ROOT.parent/"shared"/"data"/"lab-images")
    ap.add_argument("--kind", default="efficientnet", help="model kind (default efficientnet)")
    a = ap.parse_args()
    from fruitflow.download import download
    from fruitflow.preprocess import preprocess
    from fruitflow.train import bfloat16_native
    work = Path(tempfile.mkdtemp(prefix="fruitflow-precision-"))
    download(str(a.images), work/"data", work/"manifest.csv")
    preprocess(work/"manifest.csv", work/"split", 96, seed=42)
    print(f"{a.kind} on {a.images}, 10 epochs, {a.pairs} pair(s); this CPU {'has' if bfloat16_native() else 'emulates'} bfloat16")
    times = {"bfloat16": [], "float32": []}
    for i in range(a.pairs):
        for p in (("bfloat16", "float32") if i % 2 == 0 else ("float32", "bfloat16")):
            out = subprocess.run([sys.executable, "-c", ONE, str(work/"split"), str(work/p/"model.keras"), a.kind, p], capture_output=True, text=True,
                                 env={"TF_CPP_MIN_LOG_LEVEL": "3", **os.environ})
            if out.returncode: sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            times[p].append(r["seconds"])
            print(f"pair {i + 1} {p:8}: train {r['seconds']:5.2f} s, val_loss {r['val_loss']:.4f}", flush=True)
    b, f = (statistics.median(times[p]) for p in ("bfloat16", "float32"))
    print(f"medians: bfloat16 {b:.2f} s, float32 {f:.2f} s; float32/bfloat16 {f / b:.2f}x ({b - f:+.2f} s a run for float32)")
