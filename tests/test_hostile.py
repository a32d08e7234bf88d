"A photo folder mixing good and hostile files: every file is used (converted) or skipped with its reason."
import io, json, os, struct, zlib
from pathlib import Path
from PIL import Image
from conftest import FAST, fruitflow, mlflow_client, runs
from fruitflow.download import draw

def _bomb() -> bytes:
    "A valid 1x1 PNG whose header claims 30000x30000 pixels."
    buf = io.BytesIO(); Image.new("L", (1, 1)).save(buf, format="PNG"); png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 30000, 30000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)

def hostile_folder(root: Path) -> tuple[Path, dict, set]:
    "Good synthetic photos plus one file of each hostile kind: (folder, skipped name → reason word, converted names)."
    src = root/"photos"
    for c in ("apple", "orange"):
        (src/c).mkdir(parents=True)
        for i in range(5): draw(c, i, 64).save(src/c/f"{c}-{i}.jpg")
    a, o = src/"apple", src/"orange"
    draw("apple", 50, 64).save(a/"really-png.jpeg", format="PNG")
    draw("apple", 51, 64).convert("CMYK").save(a/"cmyk.jpg")
    draw("apple", 52, 64).convert("L").save(a/"grey.jpg")
    draw("orange", 53, 64).convert("RGBA").save(o/"rgba.png")
    draw("orange", 54, 64).convert("P").save(o/"palette.gif")
    (a/"empty.jpg").write_bytes(b"")
    (a/"truncated.jpg").write_bytes((a/"apple-0.jpg").read_bytes()[:400])
    (o/"error-page.jpg").write_text("<!DOCTYPE html><html><body>429 Too Many Requests</body></html>")
    Image.new("RGB", (1, 1), "orange").save(o/"pixel.png")
    (o/"bomb.png").write_bytes(_bomb())
    (a/".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (a/"nested").mkdir(); draw("apple", 55, 64).save(a/"nested"/"hidden-away.jpg")
    os.symlink("/etc/hostname", o/"outside.jpg")
    skipped = {"empty.jpg": "empty", "truncated.jpg": "not a readable image", "error-page.jpg": "not a readable image",
               "pixel.png": "too small", "bomb.png": "limit", ".DS_Store": "hidden", "nested": "sub-folder",
               "outside.jpg": "outside the dataset"}
    return src, skipped, {"really-png.jpeg", "cmyk.jpg", "grey.jpg", "rgba.png", "palette.gif"}

def test_hostile_folder_trains_and_accounts_for_every_file(tmp_path, prefect_api):
    src, skipped, converted = hostile_folder(tmp_path)
    wd = tmp_path/"work"; wd.mkdir()
    p = fruitflow("run", "--source", src, *FAST, workdir=wd, env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    (run,) = runs(wd)
    assert run.info.status == "FINISHED" and run.data.tags["data_source"] == "folder"
    assert run.data.tags.get("registered_version")
    c = mlflow_client(wd)
    split = json.loads(Path(c.download_artifacts(run.info.run_id, "data/split.json", str(tmp_path))).read_text())
    got = {Path(s["path"]).name: s["reason"] for s in split["skipped"]}
    assert set(got) == set(skipped), got
    for name, word in skipped.items():
        assert word in got[name], (name, got[name])
        assert any(name in l and "skipped" in l for l in p.stdout.splitlines()), f"{name} not reported on the console"
    used = {Path(f).name for f in split["files"]}
    assert converted <= used and len(used) == 10 + len(converted)
    assert run.data.metrics["n_skipped"] == len(skipped)
