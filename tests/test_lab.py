"""`fruitflow lab`: a real JupyterLab on a free loopback port, its real contents and sessions APIs, headless Chromium.

One JupyterLab over the project serves the tests of the notebooks in `nbs/` (saving through its contents API, the
browser running a cell); a failed run (preprocess on a folder with a broken photo, the cheapest real failure) is
reopened with `fruitflow lab --run latest` in a second one. Saves write the real `nbs/03_train.ipynb` (that is the
point: `git diff` stays empty); each such test puts the file's bytes back if they changed, and JupyterLab's
autosave is off in these servers (their settings folder is a temporary one) so that a browser edit is never written.
"""
from __future__ import annotations
import contextlib, json, os, re, signal, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest
from conftest import BIN, FAST, ROOT, free_port, fruitflow, wait_for

pytestmark = pytest.mark.xdist_group("lab")  # its module-scoped fixtures: one worker runs the module

TRAIN = "nbs/03_train.ipynb"

def _api(url: str, token: str, body: dict|None = None, method: str|None = None):
    "Call JupyterLab's REST API with the token; the decoded answer."
    req = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r: return json.loads(r.read() or b"{}")

def _kernels(pid: int) -> list:
    "The kernel processes under JupyterLab's process `pid`."
    import psutil
    def cmdline(p):
        try: return " ".join(p.cmdline())
        except psutil.Error: return ""  # gone, or a zombie: not a running kernel
    return [p for p in psutil.Process(pid).children(recursive=True) if "ipykernel" in cmdline(p)]

class Lab:
    "`fruitflow lab --no-browser` running in the background: its process, URL, token and JupyterLab's pid."
    def __init__(self, workdir: Path, settings: Path, *args):
        settings.mkdir(parents=True, exist_ok=True)
        (settings/"@jupyterlab"/"docmanager-extension").mkdir(parents=True, exist_ok=True)
        (settings/"@jupyterlab"/"docmanager-extension"/"plugin.jupyterlab-settings").write_text('{"autosave": false}')
        (settings/"@jupyterlab"/"apputils-extension").mkdir(parents=True, exist_ok=True)
        (settings/"@jupyterlab"/"apputils-extension"/"notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news toast
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "JUPYTER_TOKEN"))}
        env |= {"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(settings/"workspaces")}
        self.workdir, self.port = Path(workdir), free_port()
        self.proc = subprocess.Popen([str(BIN/"fruitflow"), "lab", "--no-browser", "--port", str(self.port), "--workdir", str(workdir), *args],
                                     cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = wait_for(self.proc, "JupyterLab: ", timeout=300)
        self.link = re.search(r"JupyterLab: (\S+)", self.out)[1]
        self.url, self.token = f"http://127.0.0.1:{self.port}", self.link.split("?token=")[1]
        self.jupyter = json.loads((self.workdir/".fruitflow"/"lab.json").read_text())["pid"]

    def api(self, path: str, body: dict|None = None, method: str|None = None): return _api(self.url + path, self.token, body, method)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(60)
            except subprocess.TimeoutExpired: self.proc.kill()

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "One `fruitflow lab` over the project, its pid file in a temporary work folder."
    wd = tmp_path_factory.mktemp("lab")
    l = Lab(wd, wd/"settings")
    yield l
    l.stop()

@pytest.fixture
def train_notebook():
    "nbs/03_train.ipynb's bytes, put back after the test if it changed them."
    f = ROOT/TRAIN
    before = f.read_bytes()
    yield before
    if f.read_bytes() != before: f.write_bytes(before)

def test_lab_is_loopback_with_token_auth(lab):
    assert lab.link == f"{lab.url}/lab?token={lab.token}" and len(lab.token) >= 32, lab.out
    assert lab.out.count(lab.token) == 1  # the one URL line
    with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(f"{lab.url}/api/contents/{TRAIN}", timeout=30)
    assert e.value.code == 403  # no token, no notebook
    assert lab.token not in (lab.workdir/".fruitflow"/"lab.log").read_text()  # JupyterLab shows it as "..."
    assert not (lab.workdir/".fruitflow"/"lab.token").exists()  # the file that handed it over is gone
    with pytest.raises(OSError): urllib.request.urlopen(f"http://127.0.0.2:{lab.port}/api", timeout=5)  # loopback 127.0.0.1 only
    s = fruitflow("status", "--workdir", lab.workdir, workdir=lab.workdir, timeout=60)
    line = next(l for l in s.stdout.splitlines() if l.startswith("lab"))
    assert lab.url in line and f"pid {lab.jupyter}" in line and "healthy" in line, s.stdout
    again = fruitflow("lab", "--url", "--workdir", lab.workdir, workdir=lab.workdir, timeout=60)  # the link, printed again on request
    assert again.returncode == 0 and again.stdout == f"JupyterLab: {lab.link}\n", again.stdout + again.stderr
    none = fruitflow("lab", "--url", workdir=lab.workdir.parent, timeout=60)
    assert none.returncode == 1 and "no JupyterLab runs over" in none.stderr, none.stderr

def test_saving_an_unchanged_notebook_leaves_it_as_it_was(lab, train_notebook):
    m = lab.api(f"/api/contents/{TRAIN}")
    lab.api(f"/api/contents/{TRAIN}", {"type": "notebook", "format": "json", "content": m["content"]}, "PUT")
    assert (ROOT/TRAIN).read_bytes() == train_notebook
    if (ROOT/".git").exists():
        assert subprocess.run(["git", "diff", "--quiet", "--", TRAIN], cwd=ROOT).returncode == 0

def test_saving_after_running_strips_outputs_and_keeps_tag_and_ids(lab, train_notebook):
    "As JupyterLab saves a notebook whose cells ran: outputs, counts and the metadata JupyterLab adds go; the tag and ids stay."
    nb = lab.api(f"/api/contents/{TRAIN}")["content"]
    for i, c in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        c["execution_count"], c["metadata"]["scrolled"] = i + 1, True
        c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": f"ran {i}\n"}]
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11"}
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"  # as JupyterLab names the kernel
    lab.api(f"/api/contents/{TRAIN}", {"type": "notebook", "format": "json", "content": nb}, "PUT")
    assert (ROOT/TRAIN).read_bytes() == train_notebook
    saved = json.loads((ROOT/TRAIN).read_text())
    assert [c for c in saved["cells"] if "parameters" in c["metadata"].get("tags", [])]  # papermill's tag

def test_notebook_opens_and_runs_in_the_browser(lab, train_notebook, tmp_path):
    "JupyterLab shows the parameters cell; its cells run in the project's python3 kernel, which imports fruitflow."
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import TimeoutException
    from fruitflow.screenshots import browser
    text = lambda d: d.execute_script("return document.body ? document.body.textContent : ''")
    with browser() as d:
        d.get(f"{lab.url}/lab/tree/{TRAIN}?token={lab.token}")
        WebDriverWait(d, 300).until(lambda d: 'split_dir: str = "split"' in text(d) and "Kernel status: Idle" in d.page_source, "the notebook, its kernel idle")
        params = d.execute_script("return [...document.querySelectorAll('.jp-CodeCell')].find(c => c.textContent.includes('split_dir: str'))")
        cells = lambda d: len(d.find_elements(By.CSS_SELECTOR, ".jp-CodeCell"))
        n, code = cells(d), "import fruitflow; print('got', split_dir, epochs, fruitflow.__file__)"
        shift_enter = lambda: ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        ran = lambda d: re.search(r"\[\d+\]:", params.text)
        for _ in range(6):  # run the parameters cell (the next one is then selected); again if the keys went before JupyterLab took them
            params.find_element(By.CSS_SELECTOR, ".cm-content").click()
            shift_enter()
            with contextlib.suppress(TimeoutException): WebDriverWait(d, 30).until(ran); break  # each step waits for what it did: a busy machine drops no key
        assert ran(d), "the parameters cell never ran"
        for _ in range(6):  # a new cell above the selected one; again if the keys went before JupyterLab took them
            ActionChains(d).send_keys(Keys.ESCAPE).send_keys("a").perform()
            with contextlib.suppress(TimeoutException): WebDriverWait(d, 10).until(lambda d: cells(d) > n); break
        assert cells(d) > n, "no new cell"
        ActionChains(d).send_keys(Keys.ENTER).perform()
        WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook.jp-mod-editMode"), "the new cell in edit mode")
        ActionChains(d).send_keys(code).perform()
        WebDriverWait(d, 60).until(lambda d: code in d.execute_script("return document.activeElement.closest('.jp-CodeCell')?.textContent || ''"), "the code typed")
        shift_enter()
        want = f"got split 10 {ROOT/'fruitflow'/'__init__.py'}"
        WebDriverWait(d, 300).until(lambda d: any(want in o.text for o in d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")), f"the output {want!r}")
        d.save_screenshot(str(tmp_path/"lab-train.png"))
    assert (tmp_path/"lab-train.png").stat().st_size > 20_000
    assert (ROOT/TRAIN).read_bytes() == train_notebook  # nothing saved

@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, prefect_api):
    "A run whose preprocess step failed on a broken photo: (workdir, completed process)."
    src, wd = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("failed")
    from fruitflow.download import draw
    for c in ("apple", "orange"): (src/c).mkdir()
    for i in range(4): draw("apple", i, 48).save(src/"apple"/f"{i}.png")
    (src/"orange"/"orange.jpg").write_text("<html>not a photo</html>")
    p = fruitflow("run", "--source", src, *FAST, workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    return wd, p

def test_failed_step_reopens_with_its_error(failed_run, tmp_path):
    wd, p = failed_run
    (run_dir,) = (wd/"runs").iterdir()
    assert f"debug it: fruitflow lab --run {run_dir} --step preprocess;" in p.stderr, p.stderr
    record = (run_dir/"02_preprocess.ipynb").read_bytes()
    lab = Lab(wd, tmp_path/"settings", "--run", "latest")  # the step that failed, by default
    try:
        copy = run_dir/"02_preprocess.debug.ipynb"
        assert f"copied to debug: {copy}" in lab.out and lab.link == f"{lab.url}/lab/tree/runs/{run_dir.name}/{copy.name}?token={lab.token}", lab.out
        (s,) = [s for s in lab.api("/api/sessions") if s["path"] == f"runs/{run_dir.name}/{copy.name}"]  # a kernel started for it
        kernels = _kernels(lab.jupyter)
        assert len(kernels) == 1, kernels
        from selenium.webdriver.support.ui import WebDriverWait
        from fruitflow.screenshots import browser
        with browser() as d:
            d.get(lab.link)
            text = lambda d: d.execute_script("return document.body ? document.body.textContent : ''")
            WebDriverWait(d, 300).until(lambda d: "DataError" in text(d) and "class 'orange'" in text(d) and 'mlflow_run_id = ""' in text(d), "the error output")
            assert d.execute_script("return document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]').length") > 0
        m = lab.api(f"/api/contents/runs/{run_dir.name}/{copy.name}")  # saved unchanged outside nbs/: the error output stays
        lab.api(f"/api/contents/runs/{run_dir.name}/{copy.name}", {"type": "notebook", "format": "json", "content": m["content"]}, "PUT")
        assert "DataError" in copy.read_text()
        assert (run_dir/"02_preprocess.ipynb").read_bytes() == record  # the run's record is as it ran
        d = fruitflow("down", "--workdir", wd, workdir=wd, timeout=120)
        assert d.returncode == 0 and f"stopped lab (pid {lab.jupyter})" in d.stdout, d.stdout + d.stderr
        assert lab.proc.wait(60) == 0
        import psutil
        assert not [k for k in kernels if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        assert not (wd/".fruitflow"/"lab.json").exists()
    finally: lab.stop()

def test_sigterm_stops_lab_and_its_kernels(lab):
    import psutil
    lab.api("/api/sessions", {"path": TRAIN, "type": "notebook", "name": "03_train.ipynb", "kernel": {"name": "python3"}})
    kernels = _kernels(lab.jupyter)
    assert kernels and not any(lab.token in v for k in kernels for v in k.environ().values())  # a notebook cannot read the token
    lab.proc.send_signal(signal.SIGTERM)
    assert lab.proc.wait(60) == 0
    assert not psutil.wait_procs(kernels, timeout=10)[1] and not psutil.pid_exists(lab.jupyter)
    assert not (lab.workdir/".fruitflow"/"lab.json").exists()

@pytest.mark.quick
@pytest.mark.parametrize("args, says", [(["--run", "nosuch"], "no run 'nosuch'"), (["--step", "train"], "no run to resume")])
def test_bad_run_is_one_line(tmp_path, args, says):
    p = fruitflow("lab", "--no-browser", "--workdir", tmp_path, *args, workdir=tmp_path, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr

def test_a_config_turning_auth_off_is_refused(tmp_path):
    "A Jupyter config of the user's that empties the token: `fruitflow lab` finds JupyterLab open to anyone, stops it, says so."
    (tmp_path/"config").mkdir()
    (tmp_path/"config"/"jupyter_server_config.py").write_text('c.IdentityProvider.token = ""\n')
    p = fruitflow("lab", "--no-browser", "--port", free_port(), "--workdir", tmp_path, workdir=tmp_path,
                  env={"JUPYTER_CONFIG_DIR": str(tmp_path/"config")}, timeout=300)
    assert p.returncode == 1 and "without the token" in p.stderr and "JupyterLab: " not in p.stdout, p.stdout + p.stderr
    assert not (tmp_path/".fruitflow"/"lab.json").exists()
