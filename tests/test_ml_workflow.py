"The lab's prototype notebook `ml_workflow.ipynb`: committed executed, top to bottom, without errors, with the model fixed."
import ast, re, shutil
from pathlib import Path
import nbformat
import pytest
from conftest import LAB_IMAGES, ROOT

pytestmark = pytest.mark.quick  # no server, no pipeline run

NB = ROOT/"ml_workflow.ipynb"
COMMAND = ".venv/bin/papermill ml_workflow.ipynb ml_workflow.ipynb -k python3"

@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NB, as_version=4)

def code_cells(nb): return [c for c in nb.cells if c.cell_type == "code"]

def text(cell) -> str:
    "Everything a cell printed or displayed, as plain text."
    return "".join(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", "") for o in cell.outputs)

def cell_with(nb, snippet: str):
    (cell,) = [c for c in code_cells(nb) if snippet in c.source]
    return cell

def test_valid_and_runs_in_a_plain_python3_kernel(nb):
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"

def test_executed_top_to_bottom_in_one_go(nb):
    counts = [c.execution_count for c in code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), counts  # no unexecuted, skipped or re-run cells

def test_no_error_outputs(nb):
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert not any("Traceback (most recent call last)" in text(c) for c in code_cells(nb))

def test_one_parameters_cell_of_typed_literals(nb):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    values = {}
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign), ast.unparse(stmt)  # no imports, calls or logic
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)  # raises on anything but a literal
    assert {"DATASET", "IMAGE_SIZE", "BATCH_SIZE", "EPOCHS", "DATASET_URL", "LOCAL_FOLDER"} <= set(values) and values["LOCAL_FOLDER"] == ""
    assert values["IMAGE_SIZE"] == (150, 150) and values["BATCH_SIZE"] == 8 and values["EPOCHS"] == 10
    assert values["DATASET"].startswith("data/")  # git ignores data/: the dataset is never committed
    assert values["DATASET_URL"].startswith("https://github.com/HOGENT-MLOps/mlops-labs/")

def test_every_code_cell_explained_and_command_documented(nb):
    kinds = [c.cell_type for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    assert all(kinds[i - 1] == "markdown" for i, k in enumerate(kinds) if k == "code"), kinds  # each code cell follows its explanation
    assert COMMAND in nb.cells[0].source
    assert any("from_logits" in c.source and "softmax" in c.source for c in nb.cells if c.cell_type == "markdown")

def test_core_code_does_not_need_fruitflow(nb):
    "fruitflow is only an optional source of synthetic drawings, imported under `except ImportError`."
    for c in code_cells(nb):
        tree = ast.parse(c.source)
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and any("ImportError" in ast.unparse(h.type) for h in t.handlers)
                   for s in t.body for n in ast.walk(s)}
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and "fruitflow" in ast.unparse(n): assert id(n) in guarded, ast.unparse(n)

def _call(tree, name):
    "The first call whose function reads `name` (e.g. 'model.compile')."
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == name)

def test_fixed_model_softmax_with_matching_loss_and_small(nb):
    build = ast.parse(cell_with(nb, 'name="fixed_model"').source)
    (assign,) = [s for s in build.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "model"]
    layers = [ast.unparse(e) for e in assign.value.args[0].elts]
    assert layers[-1] == "layers.Dense(2, activation='softmax')", layers
    assert not any("Flatten" in l for l in layers) and any("GlobalAveragePooling2D" in l for l in layers), layers
    loss = next(k.value for k in _call(ast.parse(cell_with(nb, "model.compile(").source), "model.compile").keywords if k.arg == "loss")
    assert ast.unparse(loss) == "keras.losses.SparseCategoricalCrossentropy(from_logits=False)"
    out = text(cell_with(nb, 'name="fixed_model"'))
    assert int(re.search(r"The fixed model: ([\d,]+) parameters", out)[1].replace(",", "")) < 100_000
    assert "44,860,482" in text(cell_with(nb, 'name="lab_model"'))  # the lab's model, shown for contrast

def test_training_and_evaluation_have_outputs(nb):
    assert "Found" in text(cell_with(nb, "image_dataset_from_directory"))
    fit = text(cell_with(nb, "model.fit("))
    assert "val_accuracy" in fit and "Epoch 1/" in fit
    evaluation = text(cell_with(nb, "model.evaluate("))
    accuracy = float(re.search(r"Test accuracy: ([\d.]+)", evaluation)[1])
    assert 0 <= accuracy <= 1 and "Test loss:" in evaluation

def test_says_which_data_it_used(nb):
    out = text(cell_with(nb, "def download_from_list"))
    source = re.search(r"Data source: (.+)", out)[1]
    assert ("SYNTHETIC" in source) == ("DOWNLOAD FAILED" in out)
    assert "SYNTHETIC" in source or source.startswith("the lab's images")
    assert f"Data: {source}" in text(cell_with(nb, "model.evaluate("))

# about 10-30 s: a real kernel, the lab's photos over HTTP on 127.0.0.1
def test_reexecutes_against_the_lab_images(tmp_path, lab_site):
    import papermill
    out = papermill.execute_notebook(str(NB), str(tmp_path/"out.ipynb"), parameters=dict(DATASET_URL=lab_site, EPOCHS=1),
                                     kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    printed = text(cell_with(out, "def download_from_list"))
    assert "really PNG" in printed and "apple-5.jpeg: not found (404), skipped" in printed and "SYNTHETIC" not in printed
    assert "Found 15 files" in text(cell_with(out, "image_dataset_from_directory"))  # PNGs named .jpeg decode too
    assert sorted(p.name for p in (tmp_path/"data/ml_workflow/dataset/test").glob("*/*")) == ["apple-10.jpeg", "orange-10.jpeg"]

def outputs(nb, kind: str) -> list[str]:
    "The text of every `stream` output named `kind` (stdout, stderr) in `nb`."
    return ["".join(o.get("text", "")) for c in code_cells(nb) for o in c.outputs if o.output_type == "stream" and o.get("name") == kind]

def test_committed_copy_ran_on_the_lab_photos_quietly_with_a_plot(nb):
    "No framework noise or warning on stderr, no path of the machine that ran it, the training curves drawn."
    (injected,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected.source.splitlines()[1:] == ['LOCAL_FOLDER = "../shared/data/lab-images"'], injected.source  # no server of one machine
    assert "Data source: the lab's images, from the folder ../shared/data/lab-images" in text(cell_with(nb, "def download_from_list"))
    assert outputs(nb, "stderr") == [], outputs(nb, "stderr")
    assert not any(p in "".join(outputs(nb, "stdout")) for p in ("/work/", "/tmp/", "/home/", "127.0.0.1"))
    assert any("image/png" in o.get("data", {}) for o in cell_with(nb, "history.history").outputs)

def _rerun(tmp_path, **parameters):
    import papermill
    shutil.copy(NB, tmp_path/NB.name)
    return papermill.execute_notebook(str(tmp_path/NB.name), str(tmp_path/NB.name), parameters=parameters or None, kernel_name="python3",
                                      cwd=str(tmp_path), progress_bar=False)

def test_reruns_as_the_readme_says_offline(tmp_path):
    """`papermill ml_workflow.ipynb ml_workflow.ipynb -k python3` elsewhere, with no internet (CI has none): it keeps the committed folder, which is
    not there, says so, and falls back to drawn photos, saying that once."""
    out = _rerun(tmp_path)
    printed = text(cell_with(out, "def download_from_list"))
    assert "LOCAL_FOLDER ../shared/data/lab-images is not a folder on this machine: downloading instead" in printed, printed
    if "DOWNLOAD FAILED" in printed:  # offline
        assert printed.count("DOWNLOAD FAILED") == 1 and printed.count("Falling back to SYNTHETIC") == 1, printed
    assert not [o for c in code_cells(out) for o in c.outputs if o.output_type == "error"] and outputs(out, "stderr") == [], outputs(out, "stderr")

def test_reruns_on_a_local_folder_of_photos(tmp_path):
    out = _rerun(tmp_path, LOCAL_FOLDER=str(LAB_IMAGES), EPOCHS=1)
    printed = text(cell_with(out, "def download_from_list"))
    assert f"Data source: the lab's images, from the folder {LAB_IMAGES}" in printed and "apple-5.jpeg: not found, skipped" in printed, printed
    assert "Found 15 files" in text(cell_with(out, "image_dataset_from_directory")) and outputs(out, "stderr") == [], outputs(out, "stderr")
