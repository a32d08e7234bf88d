"""Where a pipeline step's time goes: kernel start, imports, work and MLflow logging, per step notebook.

    python benchmarks/steps.py [--n-per-class 10] [--epochs 2] [--image-size 64]

Each step notebook is executed with papermill exactly as the flow runs it (`notebooks.step_notebook`: parameters,
exported code, run section) in a kernel of its own, twice: without tracking, then resuming an MLflow run. From the executed
notebook's per-cell `papermill.duration`:
  kernel  = wall time of the execution − the sum of the cells (kernel start and stop, papermill itself);
  imports = the parameters and `#| export` cells (the module's imports and definitions);
  work    = the run section without tracking (the step's function, its glue, and the run cell's own imports);
  logging = the run section with tracking − without (MLflow: resuming the run, params, metrics, artifacts).
Prints a table and each part's share. A measurement, not a test: run it twice on a quiet machine.
"""
import argparse, os, re, sys, tempfile, time
from pathlib import Path

def execute(step: str, params: dict, out: Path, cwd: Path):
    "Run one step notebook as the flow does; its wall time and executed cells."
    import papermill as pm, nbformat
    from fruitflow.config import KERNEL
    from fruitflow.notebooks import step_notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    pm.execute_notebook(step_notebook(step), str(out), parameters=params, kernel_name=KERNEL, cwd=str(cwd), progress_bar=False)  # a kernel of its own, as with --kernel-per-step
    wall = time.perf_counter() - t
    return wall, nbformat.read(out, as_version=4).cells

def split(wall: float, cells) -> dict:
    "The wall time of one execution cut into kernel, imports and run section."
    d = lambda c: c.metadata.get("papermill", {}).get("duration") or 0.0
    run = sum(d(c) for c in cells if re.search(r"^#\|\s*eval:\s*false", c.source, re.M))
    cells_total = sum(d(c) for c in cells)
    return dict(wall=wall, kernel=wall - cells_total, imports=cells_total - run, run=run)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fruitflow-steps-"))
    uri = f"sqlite:///{work}/mlflow.db"
    os.environ |= {"MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_LOGGING_LEVEL": "WARNING"}  # the kernels inherit these
    from mlflow import MlflowClient
    import scrapbook as sb
    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("steps", (work/"mlartifacts").as_uri())).info.run_id
    got, rows = {}, {}
    for step in ("download", "preprocess", "train", "evaluate", "register"):
        base = {"download": dict(source="synthetic", data_root=str(work/"data"), manifest_path=str(work/"manifest.csv"), n_per_class=a.n_per_class),
                "preprocess": dict(manifest_path=str(work/"manifest.csv"), out_dir=str(work/"split"), image_size=a.image_size),
                "train": dict(split_dir=str(work/"split"), model_path=str(work/"model/model.keras"), epochs=a.epochs, patience=a.epochs),
                "evaluate": dict(split_dir=str(work/"split"), model_path=str(work/"model/model.keras"), out_dir=str(work/"evaluation")),
                "register": dict(model_uri=got.get("model_uri", ""), test_accuracy=float(got.get("test_accuracy", 0.0)), data_source="synthetic"),
               }[step]
        parts = {}
        for mode, track in (("plain", dict(mlflow_run_id="", tracking_uri="")), ("tracked", dict(mlflow_run_id=rid, tracking_uri=uri))):
            if step == "register" and mode == "plain": continue  # registering is logging: measured tracked only
            out = work/"executed"/mode/f"{step}.ipynb"
            wall, cells = execute(step, base | track, out, work)
            parts[mode] = split(wall, cells)
            got |= {k: s.data for k, s in sb.read_notebook(str(out)).scraps.items()}
        tr, pl = parts["tracked"], parts.get("plain")
        rows[step] = dict(total=tr["wall"], kernel=tr["kernel"], imports=tr["imports"],
                          work=pl["run"] if pl else 0.0, logging=tr["run"] - pl["run"] if pl else tr["run"])
        print(f"{step}: " + ", ".join(f"{k} {v:.1f} s" for k, v in rows[step].items()), flush=True)
    print(f"\n{'step':<11}{'total s':>8}{'kernel':>8}{'imports':>8}{'work':>8}{'logging':>8}   (tracked run; work from the untracked one)")
    for s, r in rows.items(): print(f"{s:<11}" + "".join(f"{r[k]:>8.1f}" for k in ("total", "kernel", "imports", "work", "logging")))
    tot = {k: sum(r[k] for r in rows.values()) for k in ("total", "kernel", "imports", "work", "logging")}
    print(f"{'all':<11}" + "".join(f"{tot[k]:>8.1f}" for k in ("total", "kernel", "imports", "work", "logging")))
    print("\nshare of the steps' time: " + ", ".join(f"{k} {tot[k] / tot['total']:.0%}" for k in ("kernel", "imports", "work", "logging"))
          + f"; overhead (all but work) {1 - tot['work'] / tot['total']:.0%}, i.e. {tot['total'] / max(tot['work'], 1e-9):.1f}× the work alone")
    print(f"({2 * a.n_per_class} synthetic images, {a.epochs} epochs, {a.image_size}px; work includes the run cell's `import mlflow, scrapbook`;"
          f" a negative logging figure is noise)")
