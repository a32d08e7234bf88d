"EfficientNet-Lite0 converted from the package's torch weights, checked on the shared real photos with its own ImageNet head."
import pickle
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT

pytestmark = pytest.mark.quick  # no server, no pipeline run

REAL_PHOTOS = ROOT.parent/"shared"/"data"/"real-photos"

def _imagenet_classes(model, folder: Path, n: int) -> np.ndarray:
    "ImageNet's top class for the first `n` photos of `folder`, at the 224 px the weights were trained at."
    from fruitflow.core import load_image, to_array
    files = sorted(folder.iterdir())[:n]
    x = np.stack([to_array(load_image(f, size=224), 224) for f in files]).astype("float32")
    return model.predict(x, verbose=0).argmax(1)

def test_converted_network_calls_real_oranges_orange():
    "Its ImageNet head answers class 950 (orange) for most real oranges and rarely for real apples: layout, padding, batch norm and scaling are right."
    if not REAL_PHOTOS.is_dir(): pytest.skip(f"{REAL_PHOTOS} is missing")
    from fruitflow.efficientnet import IMAGENET_ORANGE, lite0
    model = lite0(224, top=True)
    oranges, apples = (_imagenet_classes(model, REAL_PHOTOS/c, 30) for c in ("oranges", "apples"))
    assert (oranges == IMAGENET_ORANGE).sum() >= 22, np.bincount(oranges, minlength=1000).argsort()[-5:]  # 51 of the first 60 measured
    assert (apples == IMAGENET_ORANGE).sum() <= 3, (apples == IMAGENET_ORANGE).sum()
    assert not (oranges == IMAGENET_ORANGE).all()  # a stuck network answering one class would pass the first check alone

def test_unpickler_refuses_other_globals(tmp_path):
    "A .pth whose pickle names os.system is refused, naming the global, and nothing runs."
    from fruitflow.efficientnet import read_torch
    marker = tmp_path/"ran"
    head = b"".join(pickle.dumps(v, 2) for v in (0x1950a86a20f9469cfc6c, 1001, {}))
    cmd = f"touch {marker}".encode()
    (tmp_path/"evil.pth").write_bytes(head + b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R.")
    with pytest.raises(pickle.UnpicklingError, match="evil.pth: refuses to load os.system"): read_torch(tmp_path/"evil.pth")
    assert not marker.exists()
    pickle.loads((tmp_path/"evil.pth").read_bytes()[len(head):])  # the same bytes through plain pickle: they do run (so the test can fail)
    assert marker.exists()
