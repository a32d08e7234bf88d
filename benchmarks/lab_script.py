"""The lab's prototype workflow (HOGENT-MLOps/mlops-labs, assignments/notebooks/ml_workflow.ipynb, MIT) as one plain Python script.

    python benchmarks/lab_script.py [--base-url URL] [--epochs 10] [--workdir DIR]

Rewritten from the lab notebook's steps, in order and with its constants (150 px, batch 8, 10 epochs): wipe
and recreate `dataset/{train,val,test}/{apples,oranges}`, download apple-1..10 and orange-1..10 (the 10th of
each class to test, the 9th to val, the rest to train), three `ImageDataGenerator(rescale=1/255)` directory
iterators, the lab's Conv2D → Flatten → Dense(64) → Dense(2) model compiled as the lab compiles it (its
sigmoid output fed to a from-logits loss is the lab's bug, kept on purpose: this is the baseline fruitflow
is timed against), fit, evaluate. No MLflow, no Prefect: `benchmarks/pipeline.py` runs it as a subprocess.
"""
import argparse, shutil
from pathlib import Path

GITHUB = "https://github.com/HOGENT-MLOps/mlops-labs/blob/main/resources/02-ml-workflow/img-lab2/"  # the lab's photos, as fruitflow.download.GITHUB
IMAGE_SIZE, BATCH_SIZE = (150, 150), 8  # the lab's constants
CLASSES = ("apples", "oranges")

def make_folders(dataset: Path) -> None:
    "Start from an empty `dataset/` with one folder per split and class, as the lab's `rm -rf` + `mkdir` cell does."
    shutil.rmtree(dataset, ignore_errors=True)
    for split in ("train", "val", "test"):
        for c in CLASSES: (dataset/split/c).mkdir(parents=True)

def download(base_url: str, dataset: Path) -> None:
    "Fetch apple-1..10 and orange-1..10 into their split: the 10th to test, the 9th to val, the rest to train."
    import requests
    for c in CLASSES:
        for i in range(10):
            name = f"{c[:-1]}-{i + 1}.jpeg"
            r = requests.get(f"{base_url.rstrip('/')}/{c}/{name}?raw=true", timeout=30)
            # Deviation from the lab, which raises on any failed download: the local copy of the lab's
            # photos lacks apple-5.jpeg, so a 404 skips that one file (and says so) instead of ending the run.
            if r.status_code == 404: print(f"skipped {c}/{name}: 404 not found"); continue
            r.raise_for_status()
            split = "test" if i == 9 else "val" if i == 8 else "train"
            (dataset/split/c/name).write_bytes(r.content)

def generators(dataset: Path) -> tuple:
    "The lab's train (shuffled), val and test iterators: pixels scaled to 0..1, binary labels."
    # Keras 3 still ships ImageDataGenerator (keras.src.legacy), so the lab's own API is used, not a substitute.
    from tensorflow.keras.preprocessing.image import ImageDataGenerator
    flow = lambda split, shuffle: ImageDataGenerator(rescale=1 / 255).flow_from_directory(
        dataset/split, target_size=IMAGE_SIZE, batch_size=BATCH_SIZE, class_mode="binary", shuffle=shuffle)
    return flow("train", True), flow("val", False), flow("test", False)

def build_model():
    "The lab's model and compilation, unchanged (bug included)."
    from tensorflow import keras
    from tensorflow.keras import layers
    m = keras.Sequential([layers.Conv2D(32, (3, 3), input_shape=IMAGE_SIZE + (3,)), layers.Activation("relu"),
                          layers.Flatten(), layers.Dense(64), layers.Activation("relu"),
                          layers.Dense(2), layers.Activation("sigmoid")])
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return m

def main(base_url: str, epochs: int, workdir: Path) -> None:
    "The lab notebook's cells, top to bottom."
    dataset = workdir/"dataset"
    make_folders(dataset)
    download(base_url, dataset)
    train, val, test = generators(dataset)
    model = build_model()
    model.fit(train, epochs=epochs, steps_per_epoch=len(train), validation_data=val, validation_steps=len(val))
    loss, acc = model.evaluate(test)
    print(f"test loss {loss:.3f}, test accuracy {acc:.3f}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default=GITHUB, help="where apples/ and oranges/ are (default: the lab's GitHub folder)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (the lab's EPOCHS = 10)")
    ap.add_argument("--workdir", default=".", help="folder that gets dataset/ (wiped first, as in the lab)")
    a = ap.parse_args()
    main(a.base_url, a.epochs, Path(a.workdir))
