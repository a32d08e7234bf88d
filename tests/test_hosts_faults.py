"""Faults across hosts: on the server host and two worker hosts of `test_hosts.py` (a set of its own, made by the
same fixtures, so that pytest-xdist runs this module beside that one), a worker host's link cut mid-run, and each
server killed mid-run and started again. Each test asserts what must hold however the fault ends: the flow run
reaches a final state, its MLflow run is not left RUNNING (at once, or from the `pending.json` that keeps its
ending, by the next run in that folder), and the workers run the next flow runs. What the user saw, and how long
it took, is printed (`pytest -s`) and written down in docs/scale-out.md.
"""
from __future__ import annotations
import json, os, signal, sys, time
from pathlib import Path
import pytest
from test_hosts import ROOT_ONLY, FINAL, RUNS, alive, start_runs, states, team, wait_until, worker_logs, workers  # the fixtures too

pytestmark = [ROOT_ONLY, pytest.mark.xdist_group("hosts-faults")]  # its own hosts and servers: one worker runs the module

def new_run_folder(team, before: set, step: str):
    "The worker host, and the folder, of the run that is not in `before` once it has reached `step` (a notebook's name)."
    h, root = team["hosts"], team["root"]
    return next(((w, d) for w in (h["w1"], h["w2"]) for d in (root/w.ns/"runs").glob("*") if d not in before and (d/step).exists()), None)

def run_folders(team) -> set: return {d for w in (team["hosts"]["w1"], team["hosts"]["w2"]) for d in (team["root"]/w.ns/"runs").glob("*")}

def mlflow_run(team, flow_run: str) -> dict:
    "The MLflow run of `flow_run`, asked from worker host w2."
    p = team["hosts"]["w2"].run(sys.executable, "-c", RUNS, env=team["client"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = [r for r in json.loads(p.stdout)["runs"] if r["flow_run"] == flow_run]
    return run

def ended(team, fid: str, timeout: float = 600) -> str:
    "The flow run's final state type, once it has one."
    return wait_until(lambda: s[0] if (s := states(team, [fid]))[0] in FINAL else None, f"flow run {fid} final", timeout=timeout, every=2)

def settled(team, workers, fid: str) -> tuple[dict, str]:
    """The MLflow run of flow run `fid` once it is no longer RUNNING, and how: at once, or by the next runs on the workers
    (a run ending kept in `pending.json` while the server did not answer is applied by the next run in that folder;
    two runs at once give each worker one, as in `test_two_worker_hosts_two_runs`)."""
    run = mlflow_run(team, fid)
    if run["status"] != "RUNNING": return run, "at once"
    assert (Path(run["run_dir"])/"pending.json").exists(), run  # kept, not lost
    ids = start_runs(team, 2)
    assert [ended(team, i) for i in ids] == ["COMPLETED"] * 2, worker_logs(team)
    return mlflow_run(team, fid), "by the next run in its folder"

def kill_server(team, name: str) -> None:
    "Stop server `name` of the server host as a crash would (SIGKILL to its process group), and wait until it is gone."
    pid = json.loads((team["team"]/".fruitflow"/f"{name}.json").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), f"{name} gone", timeout=60, every=0.2)

@pytest.mark.long
@pytest.mark.parametrize("name", ["mlflow", "prefect"])
def test_a_server_restarted_under_a_running_flow_run(team, workers, name):
    """The MLflow server (or Prefect's) killed during a worker's train step and started again 10 s later with
    `fruitflow up`: the flow run ends, its MLflow run ends (at once, or by the next run in that worker's folder from
    its `pending.json`), and the workers, reconnected, run the next runs."""
    before = run_folders(team)
    (fid,) = start_runs(team, 1, "-p", "epochs=3")
    host, folder = wait_until(lambda: new_run_folder(team, before, "03_train.ipynb"), "the run reaching its train step", timeout=600, every=0.5)
    kill_server(team, name)
    t0 = time.monotonic()
    time.sleep(10)
    up = team["up_again"]()
    assert up.returncode == 0 and f"{'mlflow' if name == 'prefect' else 'prefect'} is already running" in up.stdout, up.stdout + up.stderr
    back = time.monotonic()
    state = ended(team, fid)
    took = time.monotonic() - back
    run, how = settled(team, workers, fid)
    print(f"{name} down for {back - t0:.0f} s on the server host under a run on {host.ns}: flow run {state} {took:.0f} s after it was back; "
          f"MLflow run {run['status']} ({how})")
    assert run["status"] in ("FINISHED", "FAILED") and not (folder/"pending.json").exists(), (run, worker_logs(team))
    assert all(w.poll() is None for w in workers["procs"]), worker_logs(team)
    if how == "at once":  # a worker takes the next run
        assert ended(team, start_runs(team, 1)[0]) == "COMPLETED", worker_logs(team)

@pytest.mark.long
def test_a_worker_hosts_link_cut_mid_run_and_restored(team, workers):
    """The cable of the worker host running a flow run pulled out for 30 s during its train step, then plugged back.
    Nothing is left RUNNING: the flow run ends, its MLflow run ends, and the worker, reconnected, runs the next one."""
    h, root = team["hosts"], team["root"]
    before = {d for w in (h["w1"], h["w2"]) for d in (root/w.ns/"runs").glob("*")}
    (fid,) = start_runs(team, 1, "-p", "epochs=3")
    def training():  # the host whose new run folder has reached the train step
        return next((w for w in (h["w1"], h["w2"]) for d in (root/w.ns/"runs").glob("*") if d not in before and (d/"03_train.ipynb").exists()), None)
    host = wait_until(training, "the run reaching its train step", timeout=600, every=0.5)
    host.link(False)
    cut = time.monotonic()
    time.sleep(30)
    host.link(True)
    back = time.monotonic()
    final = lambda i: lambda: s if (s := states(team, [i]))[0] in FINAL else None
    got = wait_until(final(fid), "the flow run ending after the link came back", timeout=600, every=2)
    ended = time.monotonic() - back
    p = h["w2"].run(sys.executable, "-c", RUNS, env=team["client"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = [r for r in json.loads(p.stdout)["runs"] if r["flow_run"] == fid]
    pending = list(Path(run["run_dir"]).glob("pending.json"))
    print(f"link cut for {back - cut:.0f} s on {host.ns}: flow run {got[0]} {ended:.0f} s after it came back; MLflow run {run['status']}; pending.json {'kept' if pending else 'none'}")
    assert run["status"] in ("FINISHED", "FAILED") and not pending, (run, worker_logs(team))
    assert all(w.poll() is None for w in workers["procs"]), worker_logs(team)  # the worker reconnected ...
    (nid,) = start_runs(team, 1)
    assert wait_until(final(nid), "the next flow run", timeout=600, every=2) == ["COMPLETED"], worker_logs(team)  # ... and works
