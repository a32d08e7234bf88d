"""Orchestration overhead: `fruitflow run` (Prefect + papermill + MLflow) against the same work in one plain process.

    python benchmarks/pipeline.py [--n-per-class 10] [--epochs 3] [--image-size 96]

Both sides use the same synthetic images (drawn once, before timing), the same split, model and epochs.
The pipeline side is timed from the outside, per step from its own progress lines; the plain side calls
the exported step functions one after another, without kernels, Prefect or MLflow. Prints each step's
time, the totals and their ratio. A measurement, not a test: these machines are noisy, run it twice.
"""
import argparse, os, re, subprocess, sys, tempfile, time
from pathlib import Path

def plain(src: Path, work: Path, a) -> dict:
    "The pipeline's work in this process: the step functions, nothing around them."
    times, t = {}, time.perf_counter()
    from fruitflow.download import download
    out = download(str(src), work/"data", work/"manifest.csv")
    times["download"] = time.perf_counter() - t; t = time.perf_counter()
    from fruitflow.preprocess import preprocess
    preprocess(work/"manifest.csv", work/"split", a.image_size)
    times["preprocess"] = time.perf_counter() - t; t = time.perf_counter()
    from fruitflow.train import train
    m = train(work/"split", work/"model/model.keras", epochs=a.epochs, patience=a.epochs)
    times["train"] = time.perf_counter() - t; t = time.perf_counter()
    from fruitflow.evaluate import evaluate
    evaluate(work/"split", m["model_path"], work/"evaluation")
    times["evaluate"] = time.perf_counter() - t
    return times

def pipeline(src: Path, work: Path, a) -> tuple[dict, float]:
    "`fruitflow run` on the same images, as a user runs it; step times from its progress lines."
    t = time.perf_counter()
    p = subprocess.run([Path(sys.executable).parent/"fruitflow", "run", "--source", str(src), "--epochs", str(a.epochs),
                        "--image-size", str(a.image_size), "--workdir", str(work)], capture_output=True, text=True)
    total = time.perf_counter() - t
    if p.returncode: sys.exit(f"fruitflow run failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return {m[0]: float(m[1]) for m in re.findall(r"\] (\w+) done in ([\d.]+) s", p.stdout)}, total

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=96)
    a = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = Path(tempfile.mkdtemp(prefix="fruitflow-bench-"))
    from fruitflow.download import _synthetic
    src = _synthetic(root/"images", a.n_per_class, seed=42)
    steps_p, total_p = pipeline(src, root/"pipeline", a)
    t = time.perf_counter()
    steps_b = plain(src, root/"plain", a)
    total_b = time.perf_counter() - t
    print(f"\n{'step':<12}{'pipeline s':>12}{'plain s':>10}{'ratio':>8}")
    for s in ("download", "preprocess", "train", "evaluate", "register"):
        p_, b_ = steps_p.get(s, float("nan")), steps_b.get(s, float("nan"))
        print(f"{s:<12}{p_:>12.1f}{b_:>10.1f}{p_ / b_ if b_ == b_ and b_ else float('nan'):>8.1f}")
    print(f"{'total':<12}{total_p:>12.1f}{total_b:>10.1f}{total_p / total_b:>8.1f}")
    print(f"\norchestration overhead: the pipeline took {total_p / total_b:.1f}× the plain process "
          f"({2 * a.n_per_class} images, {a.epochs} epochs, {a.image_size}px; pipeline total includes Prefect start-up and registration)")
