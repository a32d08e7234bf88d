"""Cross-validated accuracy of the default model against the lab's architecture (`--model lab`) on the lab's photos.

    python benchmarks/accuracy.py [--models small lab] [--k 3] [--repeats 3] [--epochs 10] [--image-size 96] [--images /work/shared/data/lab-images] [--transfer]

`--models` takes model kinds and the named variants of `VARIANTS` (the configurations issue 6's model work
compared, e.g. `small-old`: the default model and training before that work; `small+synthetic40`: every
training fold mixed with 40 synthetic photos per class from fruitflow's generator, `train(synthetic=40)`,
the test and validation images all real: what `fruitflow run` trains by default), so every reported figure
can be reproduced by name. Plain `small` and `lab` mix in nothing.

The photos are read where they are (never copied); each model kind gets the same stratified folds and
seeds (`fruitflow.crossval`). Prints each model's mean accuracy over all folds with its standard deviation,
the spread of the per-seed means, and the difference. With ~19 photos a fold tests 6-7 of them: read the
spread before the mean. A measurement on the lab's images only, not the unseen real photos of issue 6.

`--transfer` adds what `fruitflow run` learns offline, where it has no real photo at all: per seed, the
synthetic source's photos (`download("synthetic", n_per_class=--n-per-class)`), preprocessed and split as
the pipeline does, the default model trained on them with 40 more drawn photos a class mixed in, then tested
on every one of the lab's real photos. Drawn-to-real transfer, the model never having seen a real photo.

`--real` measures on the shared real photos (`../shared/data/real-photos`, 2,014 ImageNet photos), for each
model kind of `--models` (plain kinds): trained as `fruitflow run` trains on the lab's photos (the lab's 19
split by preprocess, 40 synthetic photos a class mixed in), over `--repeats` seeds, the accuracy on the real
photos' report half, with the training time; and trained on 80 % of the real photos (a tenth of them for early
stopping), the accuracy on the other 20 %, all taken from the report half. The photos are split in halves by
a digest of their file name: choices (the image size of `efficientnet`, its head's recipe) were made on the
other half, `--half choose`, and the figures reported are on `--half report`. With `--drawn`, each model is
trained instead on what an offline `fruitflow run` gets, the synthetic source's drawn photos (`--n-per-class`
a class, split by preprocess; 40 more mixed in for `small` and `lab`), and tested on the same half; the 80 %
part is skipped.
"""
import argparse, hashlib, json, os, statistics, sys, tempfile, time
from pathlib import Path

# name: (model kind, extra keyword arguments of fruitflow.train.train, synthetic photos per class mixed into each training fold)
VARIANTS = {
    "small-old": ("small", dict(min_steps=0, min_epochs=0, colour=False, schedule=False), 0),  # one pass per epoch, constant rate, no colour branch
    "small-colour": ("small", dict(colour=True), 0),  # the new training plus the colour-histogram branch
    "small+synthetic10": ("small", {}, 10),  # the default model, its training folds mixed with synthetic photos
    "small+synthetic40": ("small", {}, 40),  # what the pipeline trains by default
    "efficientnet-fruit": ("efficientnet", dict(features="fruit"), 0),  # its head on ImageNet's scores of its 10 fruit classes (--real; before 2026-12-03, a tiny split's default)
}

def _with_options(options: dict):
    "Make crossval's calls of `fruitflow.train.train` pass `options` (crossval takes no extra training options)."
    import fruitflow.train as t
    original = t.train
    def train(*args, **kw): return original(*args, **(kw | options))
    t.train = train
    return lambda: setattr(t, "train", original)

def transfer(work: Path, a, seed: int) -> float:
    "Accuracy on every lab photo (`work`/split) of the default model trained, as `fruitflow run --source synthetic` trains it, on drawn photos only."
    import keras, numpy as np
    from fruitflow.download import download
    from fruitflow.preprocess import preprocess
    from fruitflow.train import train, split_info
    d = work/f"transfer-{seed}"
    download("synthetic", d/"data", d/"manifest.csv", n_per_class=a.n_per_class, seed=seed)
    preprocess(d/"manifest.csv", d/"split", a.image_size, seed=seed)
    keras.backend.clear_session()
    m = keras.models.load_model(train(d/"split", d/"model.keras", "small", a.epochs, a.batch_size, seed=seed, synthetic=40)["model_path"])
    drawn, real = split_info(d/"split")["classes"], split_info(work/"split")["classes"]  # apple, orange against the lab's apples, oranges
    kind = lambda c: c.lower().rstrip("s")
    assert sorted(map(kind, drawn)) == sorted(map(kind, real)), (drawn, real)
    pred = m.predict(np.load(work/"split"/"x.npy").astype("float32"), verbose=0).argmax(1)
    return float(np.mean([kind(drawn[p]) == kind(real[y]) for p, y in zip(pred, np.load(work/"split"/"y.npy"))]))

REAL_PHOTOS = Path(__file__).resolve().parent.parent.parent/"shared"/"data"/"real-photos"
HALVES = {"choose": 0, "report": 1}

def half(path: str) -> int:
    "Which half of the real photos `path` is in: 0 (choose with) or 1 (report on), by a digest of its file name."
    return int(hashlib.sha256(Path(path).name.encode()).hexdigest()[:8], 16) % 2

def _accuracy(model_path: Path, split_dir: Path, idx: list[int], classes: list[str]) -> float:
    "Accuracy of the saved model on images `idx` of `split_dir`, its classes matched by name."
    import keras, numpy as np
    from fruitflow.train import split_info
    m, info = keras.saving.load_model(model_path), split_info(split_dir)
    x, y = np.load(split_dir/"x.npy", mmap_mode="r"), np.load(split_dir/"y.npy")
    p = np.concatenate([m.predict(x[idx[i:i + 256]].astype("float32"), verbose=0).argmax(1) for i in range(0, len(idx), 256)])
    return float(np.mean([classes[a] == info["classes"][b] for a, b in zip(p, y[idx])]))

def real_photos(work: Path, a) -> None:
    "Per model kind: trained on the lab's photos over seeds, tested on a half of the real photos; trained on 80 % of the real photos, tested on 20 %."
    import keras, numpy as np
    from fruitflow.download import download, write_manifest
    from fruitflow.preprocess import preprocess
    from fruitflow.train import train, split_info
    write_manifest(REAL_PHOTOS, work/"real.csv"); write_manifest(a.images, work/"lab.csv")
    source = "drawn" if a.drawn else "lab"
    part = HALVES[a.half]
    for m in a.models:
        kind, options, _ = VARIANTS.get(m, (m, {}, 0))
        size = a.image_size or (160 if kind == "efficientnet" else 96)
        real = work/f"real-{size}"
        if not real.exists():
            t = time.perf_counter(); preprocess(work/"real.csv", real, size, seed=0); print(f"preprocess of the real photos at {size}px: {time.perf_counter() - t:.1f} s")
        info = split_info(real); chosen = [i for i, f in enumerate(info["files"]) if half(f) == part]
        accs, secs = [], []
        for seed in range(a.repeats):
            d = work/f"{source}-{m}-{seed}"
            if a.drawn: download("synthetic", d/"data", d/"manifest.csv", n_per_class=a.n_per_class, seed=seed)
            preprocess(d/"manifest.csv" if a.drawn else work/"lab.csv", d/"split", size, seed=seed)
            keras.backend.clear_session(); t = time.perf_counter()
            out = train(d/"split", d/"model.keras", kind, a.epochs, a.batch_size, seed=seed, synthetic=40, cache_dir=work/"cache", **options)
            secs.append(time.perf_counter() - t)
            accs.append(_accuracy(out["model_path"], real, chosen, split_info(d/"split")["classes"]))
            print(f"{m} seed {seed}: {accs[-1]:.3f} on {len(chosen)} real photos ({a.half} half), trained in {secs[-1]:.1f} s", flush=True)
        print(f"RESULT {source}-trained {m} {size}px: mean {statistics.mean(accs):.3f} min {min(accs):.3f} max {max(accs):.3f}"
              f" over {a.repeats} seeds; training {statistics.mean(secs):.1f} s ({min(secs):.1f}-{max(secs):.1f})", flush=True)
        if a.drawn: continue
        rng, y = np.random.default_rng(0), np.load(real/"y.npy")
        test = sorted(rng.choice(chosen, round(0.2 * len(y)), replace=False).tolist())
        rest = rng.permutation(sorted(set(range(len(y))) - set(test))).tolist()
        d = work/f"real80-{m}"; d.mkdir()
        for f in ("x.npy", "y.npy"): (d/f).symlink_to(real/f)
        n_val = len(rest) // 10
        (d/"split.json").write_text(json.dumps(info | {"splits": {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": test}}))
        keras.backend.clear_session(); t = time.perf_counter()
        out = train(d, d/"model.keras", kind, a.epochs, a.batch_size, seed=0, synthetic=40, cache_dir=work/"cache", **options)
        s = time.perf_counter() - t
        print(f"RESULT 80%-trained {m} {size}px: {_accuracy(out['model_path'], real, test, info['classes']):.3f} on {len(test)} real photos"
              f" ({len(rest) - n_val} trained on, {n_val} for early stopping); training {s:.1f} s", flush=True)

LAB_IMAGES = Path(__file__).resolve().parent.parent.parent/"shared"/"data"/"lab-images"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=LAB_IMAGES, help="a folder with one sub-folder per class")
    ap.add_argument("--models", nargs="*", default=["small+synthetic40", "small", "lab"], help="model kinds or VARIANTS names (none: only --transfer)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="seeds to repeat the k folds with")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=None, help="side of the images (default 96; --real: 160 for efficientnet, 96 otherwise)")
    ap.add_argument("--real", action="store_true", help="measure on the shared real photos (see above) instead of cross-validating on the lab's")
    ap.add_argument("--drawn", action="store_true", help="--real: train on the synthetic source's drawn photos instead of the lab's (see above)")
    ap.add_argument("--half", choices=HALVES, default="report", help="--real: the half of the real photos to test on")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--transfer", action="store_true", help="also: train on drawn photos only, test on every lab photo")
    ap.add_argument("--n-per-class", type=int, default=10, help="--transfer, --drawn: the synthetic source's photos a class (fruitflow run's default 10)")
    a = ap.parse_args()
    if not a.images.is_dir(): sys.exit(f"{a.images}: no such folder (the lab's photos, one sub-folder per class)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if a.real:
        if not REAL_PHOTOS.is_dir(): sys.exit(f"{REAL_PHOTOS}: no such folder (the shared real photos)")
        real_photos(Path(tempfile.mkdtemp(prefix="fruitflow-real-")), a)
        sys.exit(0)
    a.image_size = a.image_size or 96
    from fruitflow.download import write_manifest
    from fruitflow.preprocess import preprocess
    from fruitflow.crossval import crossval
    work = Path(tempfile.mkdtemp(prefix="fruitflow-accuracy-"))
    write_manifest(a.images, work/"manifest.csv")  # paths point into the shared folder
    n = preprocess(work/"manifest.csv", work/"split", a.image_size, seed=0)["n_images"]
    res = {}
    for m in a.models:
        t = time.perf_counter()
        kind, options, synthetic = VARIANTS.get(m, (m, {}, 0))
        undo = _with_options(options)
        try: res[m] = crossval(work/"split", work/f"cv-{m}", kind, k=a.k, repeats=a.repeats, epochs=a.epochs, batch_size=a.batch_size, seed=42, synthetic=synthetic)
        finally: undo()
        res[m]["seconds"] = time.perf_counter() - t
    print(f"\n{n} photos, {a.k} folds × {a.repeats} seeds, ≤{a.epochs} epochs, {a.image_size}px")
    print(f"{'model':<15}{'mean acc':>9}{'std':>7}{'seed means':>24}{'seeds std':>10}{'time s':>8}")
    for m, r in res.items():
        print(f"{m:<15}{r['accuracy_mean']:>9.3f}{r['accuracy_std']:>7.3f}{' '.join(f'{x:.3f}' for x in r['seed_means']):>24}{r['seed_mean_std']:>10.3f}{r['seconds']:>8.0f}")
    if a.transfer:
        t, accs = time.perf_counter(), [transfer(work, a, s) for s in range(42, 42 + a.repeats)]
        print(f"\ndrawn photos only ({a.n_per_class} a class + 40 mixed in), tested on all {n} lab photos, {a.repeats} seeds:"
              f" {statistics.mean(accs):.3f} ± {statistics.pstdev(accs):.3f} ({' '.join(f'{x:.3f}' for x in accs)}), {time.perf_counter() - t:.0f} s")
    if {"small", "lab"} <= set(res):
        s, l = res["small"], res["lab"]
        print(f"\nsmall − lab: {s['accuracy_mean'] - l['accuracy_mean']:+.3f} accuracy; time ratio small/lab {s['seconds'] / l['seconds']:.2f}")
