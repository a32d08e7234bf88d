"`benchmarks/soak.py` for 3 runs: real `fruitflow run`s in a row on one store, against the shared Prefect server."
import importlib.util, os
import pytest
from conftest import FAST, ROOT

@pytest.mark.long
def test_three_runs_in_a_row_finish_register_in_order_and_leave_nothing(tmp_path, prefect_api):
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT/"benchmarks"/"soak.py")
    spec.loader.exec_module(bench := importlib.util.module_from_spec(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))} | {"PREFECT_API_URL": prefect_api}
    records = bench.soak(3, tmp_path, ["--source", "synthetic", "--n-per-class", "6", *FAST], env)
    assert bench.problems(records, tmp_path) == [], records
    assert [r["version"] for r in records] == [1, 2, 3] and all(r["files"] > 0 for r in records), records  # the server was found and counted
