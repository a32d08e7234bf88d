"The committed lab report: its images are real PNGs, every question is answered, its figures are the run record's."
import json, re
from pathlib import Path
import pytest
from conftest import ROOT
from fruitflow.report import CAPTIONS, MAX_LINE, blocks, figures, proof

pytestmark = pytest.mark.quick  # no server, no pipeline run

REPORT = ROOT/"lab_report.md"
TEXT = REPORT.read_text()
QUESTIONS = ["python3 -m venv venv", "not tracked by Git", "Where are the dependencies installed", "PREFECT_HOME", "Model Registry"]

def test_every_image_link_is_a_png_in_the_repository():
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", TEXT)
    assert {Path(l).name for l in links} == set(CAPTIONS), links  # every dashboard the lab asks for
    for l in links:
        p = (REPORT.parent/l).resolve()
        assert p.is_relative_to(ROOT) and p.exists(), l
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{l}: not a real screenshot"

def test_every_question_has_an_answer():
    sections = re.split(r"^### ", TEXT.split("## Questions", 1)[1].split("\n## ", 1)[0], flags=re.M)[1:]
    assert len(sections) == len(QUESTIONS)
    for q, s in zip(QUESTIONS, sections):
        title, _, answer = s.partition("\n")
        assert q in title and len(answer.split()) > 60, title

def test_no_block_left_ungenerated():
    for name, content in blocks(TEXT).items(): assert "Not generated yet" not in content, name

def test_figures_are_the_run_record():
    rec = json.loads((ROOT/"img"/"run.json").read_text())
    b = blocks(TEXT)
    assert b["figures"].strip() == figures(rec).strip()
    assert rec["status"] == "FINISHED" and rec["run_id"] in TEXT
    assert f"MLflow run {rec['run_id']}: test accuracy {rec['test_accuracy']:.3f}" in b["transcript-run"]
    assert f"version {rec['version']} as @{rec['alias']}" in b["transcript-run"]
    assert "p_apple" in b["transcript-predict"] and "Traceback" not in TEXT
    assert "- [ ]" not in b["criteria"], b["criteria"]

def test_prose_of_the_run_is_generated_and_says_what_it_ran():
    "The paragraph about the run comes from its record: the data, the evidence the registry judged, the alias it gave."
    rec = json.loads((ROOT/"img"/"run.json").read_text())
    assert blocks(TEXT)["proof"].strip() == proof(rec).strip()
    assert rec["alias"] == "champion" and "cross-validated" in rec["evidence"], rec  # the lab's photos: a champion on honest evidence
    assert rec["evidence"] in blocks(TEXT)["figures"] and rec["evidence"] in rec["promotion"], rec

def test_no_machine_path_and_no_overlong_line():
    assert not re.findall(r"(?:/work/|/tmp/|/home/|/root/|/Users/)\S*", TEXT)
    for name, content in blocks(TEXT).items():
        if name.startswith("transcript"): assert max(map(len, content.splitlines())) <= MAX_LINE, name

def test_example_predictions_are_marked():
    table = blocks(TEXT)["transcript-predict"].split("```")[-1]
    rows = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| photo")]
    assert len(rows) == 2 and all(l.rstrip(" |").endswith(("right", "**wrong**")) for l in rows), table
