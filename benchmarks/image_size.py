"""What the split's image size is worth to `efficientnet` on photos unlike the training ones (issue 46), and what it costs.

    python benchmarks/image_size.py [--sizes 96 128 160 224] [--seeds 5] [--shrink 128 64]

For each `--sizes` side, over `--seeds` seeds: the lab's 19 photos preprocessed at that side and `efficientnet`
trained on them as `fruitflow run` trains it (`train()`'s defaults, the run's epochs and batch size), then tested on
both halves of the shared real photos (`../shared/data/real-photos`, split by a digest of the file name as
`benchmarks/accuracy.py` splits them: the *choose* half to choose with, the *report* half to report), as they are
(256 px JPEGs) and first shrunk to smaller originals (`--shrink`: each photo resized to that side and saved as a
JPEG of quality 90, as a web thumbnail is), so that the model meets photos with less detail than the lab's.

The backbone is frozen, so every seed's model shares it: the pooled features of each photo set are computed once
per side, with the first seed's layers below the softmax, and each seed's softmax is applied to them in NumPy.

Costs printed per side: preprocess of the lab's photos (as the pipeline's step does it) and of the 2,014 real
photos (ms a photo), the split's `x.npy` bytes a photo, `train()` alone, and the model's time a photo (batches of 64).
"""
import argparse, os, statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import LAB_IMAGES, REAL_PHOTOS, half  # the same photos and halves as the accuracy benchmark

def shrunk(side: int, dest: Path) -> Path:
    "The real photos resized to `side` px and saved as JPEGs of quality 90 in `dest`/<class>/, once."
    from PIL import Image
    for f in sorted(REAL_PHOTOS.glob("*/*.jp*g")):
        out = dest/f.parent.name/f.name
        if out.exists(): continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im: im.convert("RGB").resize((side, side), Image.LANCZOS).save(out, quality=90)
    return dest

def features(model, x, batch=64):
    "The pooled features (the input of the model's softmax) of uint8 images `x`, and the seconds a photo they took."
    import keras, numpy as np
    below = keras.Model(model.inputs, model.layers[-2].input)
    t = time.perf_counter()
    f = np.concatenate([np.asarray(below(x[i:i + batch].astype("float32"), training=False)) for i in range(0, len(x), batch)])
    return f, (time.perf_counter() - t) / len(x)

def main(a):
    import keras, numpy as np
    from fruitflow.core import softmax
    from fruitflow.download import write_manifest
    from fruitflow.preprocess import preprocess
    from fruitflow.train import train, split_info
    from fruitflow.config import Config
    run = Config()
    work = Path(tempfile.mkdtemp(prefix="fruitflow-image-size-"))
    sets = {"original": REAL_PHOTOS} | {f"shrunk to {s} px": shrunk(s, work/f"shrunk-{s}") for s in a.shrink}
    for name, folder in sets.items(): write_manifest(folder, work/f"{name}.csv")
    write_manifest(LAB_IMAGES, work/"lab.csv")
    rows = []
    for size in a.sizes:
        t = time.perf_counter(); preprocess(work/"lab.csv", work/f"lab-{size}-0", size, seed=0); lab_s = time.perf_counter() - t
        real = {}
        for name in sets:
            t = time.perf_counter(); preprocess(work/f"{name}.csv", d := work/f"{name}-{size}", size, seed=0)
            real[name] = (d, (time.perf_counter() - t) / len(split_info(d)["files"]))
        accs, train_s, feats, per_photo = {}, [], {}, None
        for seed in range(a.seeds):
            split = work/f"lab-{size}-{seed}"
            if not split.exists(): preprocess(work/"lab.csv", split, size, seed=seed)
            keras.backend.clear_session(); t = time.perf_counter()
            out = train(split, split/"model.keras", "efficientnet", run.epochs, run.batch_size, seed=seed)
            train_s.append(time.perf_counter() - t)
            model, classes = keras.saving.load_model(out["model_path"]), split_info(split)["classes"]
            w, b = model.layers[-1].get_weights()
            for name, (d, _) in real.items():
                if name not in feats:
                    feats[name], s = features(model, np.load(d/"x.npy", mmap_mode="r"))
                    per_photo = per_photo or s
                info, y = split_info(d), np.load(d/"y.npy")
                pred = softmax(feats[name] @ w + b).argmax(1)
                right = np.array([classes[p] == info["classes"][t] for p, t in zip(pred, y)])
                for h, part in (("choose", 0), ("report", 1)):
                    accs.setdefault((name, h), []).append(float(right[[half(f) == part for f in info["files"]]].mean()))
        x_bytes = (work/f"original-{size}"/"x.npy").stat().st_size / len(split_info(work/f"original-{size}")["files"])
        print(f"\n{size} px: lab preprocess {lab_s:.2f} s, real photos {1e3 * real['original'][1]:.1f} ms a photo,"
              f" x.npy {x_bytes / 1e3:.0f} kB a photo, train() {statistics.mean(train_s):.1f} s"
              f" ({min(train_s):.1f}-{max(train_s):.1f}), the model {1e3 * per_photo:.1f} ms a photo", flush=True)
        for (name, h), v in accs.items():
            print(f"RESULT {size} px, {h} half, {name}: mean {statistics.mean(v):.3f} (min {min(v):.3f}, max {max(v):.3f})"
                  f" over {a.seeds} seeds: {' '.join(f'{x:.3f}' for x in v)}", flush=True)
            rows.append((size, h, name, statistics.mean(v), min(v), max(v)))
    print("\n| image size | half | photos | mean | min-max |\n|---|---|---|---|---|")
    for size, h, name, m, lo, hi in sorted(rows, key=lambda r: (r[1], r[2], r[0])):
        print(f"| {size} | {h} | {name} | {m:.3f} | {lo:.3f}-{hi:.3f} |")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224], help="split sides to compare")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 of the lab photos' split and the training")
    ap.add_argument("--shrink", type=int, nargs="*", default=[128, 64], help="sides the real photos are also shrunk to first")
    a = ap.parse_args()
    for p in (LAB_IMAGES, REAL_PHOTOS):
        if not p.is_dir(): sys.exit(f"{p}: no such folder")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(a)
