"""Scaling of the data path: peak memory and time of preprocess and one training epoch for 200 / 2,000 (/ 10,000) synthetic images.

    python benchmarks/scale.py [--sizes 200 2000] [--large] [--image-size 32] [--batch-size 32]

`--large` adds the 10,000-image case (several minutes on two cores). Each case draws its images once (timed
apart), then runs preprocess and one training epoch of the default model, each in its own subprocess, so
each peak resident memory (`ru_maxrss`) is that phase's alone. A baseline subprocess that only imports
TensorFlow and builds the model shows how much of training's peak is the framework. The targets of issue 6:
time linear in the number of images, memory flat (peak at 10,000 images ≤ 2 GB). A measurement, not a test.
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

def _peak_mb() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

def child(phase: str, work: Path, a) -> dict:
    "One phase in this (fresh) process: its time and this process's peak RSS."
    if phase == "preprocess":
        from fruitflow.download import write_manifest
        from fruitflow.preprocess import preprocess
    else: from fruitflow.train import train, build_model
    t = time.perf_counter()  # imports are not the phase's work: the baseline shows them
    if phase == "preprocess":
        write_manifest(work/"images", work/"m.csv")
        preprocess(work/"m.csv", work/"split", a.image_size, seed=0)
    elif phase == "train":
        # min_steps=0: one pass over the images. The small model's floor of 200 steps would make every case
        # below ~9,000 images train the same 200 steps, hiding how time grows with the number of images.
        train(work/"split", work/"model/model.keras", epochs=1, batch_size=a.batch_size, patience=1, seed=0, min_steps=0)
    elif phase == "baseline":
        build_model("small", a.image_size)
    return dict(seconds=time.perf_counter() - t, peak_mb=_peak_mb())

def draw_images(dest: Path, n: int, size: int) -> None:
    "`n` synthetic JPEGs, half apples, half oranges, drawn at twice the image size (drawing big is slow and not measured)."
    from fruitflow.download import draw
    for k, label in enumerate(("apple", "orange")):
        (dest/label).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2): draw(label, k * 1_000_003 + i, 2 * size).save(dest/label/f"{i:05d}.jpg", quality=90)

def run_child(phase: str, work: Path, a) -> dict:
    "Run `phase` in a subprocess and return what it measured."
    p = subprocess.run([sys.executable, __file__, "--child", phase, "--work", str(work), "--image-size", str(a.image_size), "--batch-size", str(a.batch_size)],
                       capture_output=True, text=True, env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"})
    if p.returncode: sys.exit(f"{phase} in {work} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="total images per case (half per class)")
    ap.add_argument("--large", action="store_true", help="add the 10,000-image case")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child"); ap.add_argument("--work")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.work), a)))
        sys.exit(0)
    sizes = sorted(set(a.sizes + ([10_000] if a.large else [])))
    root = Path(tempfile.mkdtemp(prefix="fruitflow-scale-"))
    base = run_child("baseline", root, a)
    rows = []
    for n in sizes:
        work = root/f"n{n}"
        t = time.perf_counter(); draw_images(work/"images", n, a.image_size); draw_s = time.perf_counter() - t
        pre, tr = run_child("preprocess", work, a), run_child("train", work, a)
        rows.append((n, draw_s, pre, tr))
        print(f"{n:>6} images: drawn in {draw_s:.1f} s; preprocess {pre['seconds']:.1f} s, peak {pre['peak_mb']:.0f} MB; "
              f"1 epoch {tr['seconds']:.1f} s, peak {tr['peak_mb']:.0f} MB", flush=True)
    print(f"\nbaseline (import TensorFlow, build the model): peak {base['peak_mb']:.0f} MB")
    print(f"{'images':>7}{'prep s':>8}{'prep ms/img':>12}{'prep MB':>9}{'train s':>9}{'train ms/img':>13}{'train MB':>10}")
    for n, _, pre, tr in rows:
        print(f"{n:>7}{pre['seconds']:>8.1f}{1000 * pre['seconds'] / n:>12.2f}{pre['peak_mb']:>9.0f}{tr['seconds']:>9.1f}{1000 * tr['seconds'] / n:>13.2f}{tr['peak_mb']:>10.0f}")
    (n0, _, p0, t0), (n1, _, p1, t1) = rows[0], rows[-1]
    print(f"\n{n1 // n0}× the images: preprocess time ×{p1['seconds'] / p0['seconds']:.1f}, train time ×{t1['seconds'] / t0['seconds']:.1f} "
          f"(linear would be ×{n1 / n0:.0f}); peak memory ×{p1['peak_mb'] / p0['peak_mb']:.2f} (preprocess), ×{t1['peak_mb'] / t0['peak_mb']:.2f} (train); "
          f"x.npy at {n1} images: {(root/f'n{n1}'/'split'/'x.npy').stat().st_size / 2**20:.0f} MB on disk")
