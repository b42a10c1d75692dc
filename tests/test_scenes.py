"""Detection data: the synthetic scene generator (real Fashion-MNIST silhouettes, COCO JSON) and the COCO reader,
which refuses each kind of broken file with one line naming the file and the entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, edgeq_here, run_edgeq


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "train"
    r = run_edgeq("datasets", "scenes", str(out), "--n", "16", "--ood-classes", "bag,sandal", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["images"] == 16 and summary["objects"] == summary["known"] + summary["unknown"] >= 16
    return out


def test_scenes_are_coco_with_unknown_classes_marked(scenes, tmp_path):
    import cv2

    from edgeq.converter.data.coco import read_coco

    doc = json.loads((scenes / "annotations.json").read_text())
    cats = {c["id"]: c for c in doc["categories"]}
    assert sorted(c["name"] for c in doc["categories"] if c["supercategory"] == "unknown") == ["bag", "sandal"]
    for a in doc["annotations"]:
        im = doc["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 4 and h >= 4
        assert a["area"] == w * h and a["category_id"] in cats
    img = cv2.imread(str(scenes / "images" / doc["images"][0]["file_name"]))
    assert img.shape == (192, 192, 3)
    coco = read_coco(scenes)
    assert len(coco.images) == 16 and len(coco.known_categories) == 8 and len(coco.unknown_category_ids) == 2
    # same seed, same data
    again = tmp_path / "again"
    assert run_edgeq("datasets", "scenes", str(again), "--n", "16", "--ood-classes", "bag,sandal", "--seed",
                     "3").returncode == 0
    assert (again / "annotations.json").read_text() == (scenes / "annotations.json").read_text()
    assert (again / "images" / "000005.png").read_bytes() == (scenes / "images" / "000005.png").read_bytes()


def test_excluded_classes_are_never_pasted(tmp_path):
    r = run_edgeq("datasets", "scenes", str(tmp_path / "t"), "--n", "12", "--exclude-classes", "bag,sandal",
                  "--max-objects", "6")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "t" / "annotations.json").read_text())
    unknown = {c["id"] for c in doc["categories"] if c["supercategory"] == "unknown"}
    assert len(unknown) == 2 and len(doc["annotations"]) >= 12
    assert not any(a["category_id"] in unknown for a in doc["annotations"])
    assert doc["info"]["excluded_classes"] == ["bag", "sandal"]


def test_pasted_box_is_tight():
    from edgeq.converter.data.datasets import fashion_mnist
    from edgeq.converter.data.scenes import _paste

    x, _ = fashion_mnist("test")
    for k, angle in ((0, 0.0), (1, 25.0), (2, -30.0)):
        canvas = np.zeros((96, 96, 3), np.uint8)
        box = _paste(canvas, x[k], 48, angle, (40.0, 50.0), np.array([200.0, 200.0, 200.0]))
        ys, xs = np.nonzero(canvas.max(axis=2) > 0)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        w, h = box[2] - box[0], box[3] - box[1]
        assert 10 < max(w, h) <= 48 * 2 ** 0.5 + 1  # the 28-px item frame scaled to 48 px, then rotated


def _broken(scenes: Path, tmp: Path, edit) -> Path:
    dst = tmp / "broken"
    shutil.copytree(scenes, dst)
    doc = json.loads((dst / "annotations.json").read_text())
    edit(doc, dst)
    (dst / "annotations.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("name, edit, needles", [
    ("missing image", lambda d, p: (p / "images" / d["images"][2]["file_name"]).unlink(),
     ["images[2]", "000002.png not found"]),
    ("box out of range", lambda d, p: d["annotations"][3].update(bbox=[180, 10, 40, 20]),
     ["annotations[3]", "outside the 192x192 image"]),
    ("unknown category", lambda d, p: d["annotations"][1].update(category_id=42),
     ["annotations[1]", "category_id 42 is not in categories"]),
    ("empty annotations", lambda d, p: d.update(annotations=[]), ["annotation set is empty"]),
    ("unknown image id", lambda d, p: d["annotations"][0].update(image_id=999), ["annotations[0]", "image_id 999"]),
    ("not coco", lambda d, p: d.pop("categories"), ["'categories' is missing"]),
    ("duplicate image id", lambda d, p: d["images"][1].update(id=1), ["images[1]", "appears twice"]),
])
def test_coco_reader_refuses_broken_files(scenes, tmp_path, name, edit, needles):
    broken = _broken(scenes, tmp_path, edit)
    assert_clean_error(edgeq_here("datasets", "check", str(broken)), "annotations.json", *needles)
    assert run_edgeq("datasets", "check", str(scenes)).returncode == 0


def test_scene_generator_bad_inputs(tmp_path):
    assert_clean_error(edgeq_here("datasets", "scenes", str(tmp_path / "a"), "--ood-classes", "cat"),
                       "--ood-classes cat", "not Fashion-MNIST classes")
    assert_clean_error(edgeq_here("datasets", "scenes", str(tmp_path / "a"), "--exclude-classes", "bag,dog"),
                       "--exclude-classes dog", "not Fashion-MNIST classes")
    assert_clean_error(edgeq_here("datasets", "scenes", str(tmp_path / "b"), "--size", "32"), "size >= 64")
    (tmp_path / "c.json").write_text("{not json")
    assert_clean_error(edgeq_here("datasets", "check", str(tmp_path / "c.json")), "c.json", "not readable JSON")


def test_object_crops_are_the_known_objects_at_their_scene_scale(scenes, tmp_path):
    import cv2

    from edgeq.converter.data.coco import read_coco

    out = tmp_path / "crops"
    r = run_edgeq("datasets", "crops", str(scenes), str(out), "--size", "64", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    coco = read_coco(scenes)
    names = {c["id"]: c["name"] for c in coco.known_categories}
    expected = {name: 0 for name in names.values()}
    for ids in coco.category_ids.values():
        for c in ids.tolist():
            if c in names:
                expected[names[c]] += 1
    assert summary["per_category"] == expected and summary["objects"] == sum(expected.values()) > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no bag or sandal folder
    assert not list(tmp_path.glob(".crops*"))  # nothing partial left beside it
    checked = 0
    for im in coco.images:
        image = cv2.imread(str(coco.image_path(im)))
        for k, (box, c) in enumerate(zip(coco.boxes[im["id"]], coco.category_ids[im["id"]].tolist())):
            if c not in names or max(box[2] - box[0], box[3] - box[1]) * 1.25 > 64:
                continue  # only objects that keep their scale: the crop is a window of the scene
            crop = cv2.imread(str(out / names[c] / f"{im['id']:07d}_{k}.png"))
            assert crop.shape == (64, 64, 3)
            hit = cv2.matchTemplate(image, crop, cv2.TM_SQDIFF)
            _, _, (x, y), _ = cv2.minMaxLoc(hit)
            assert hit.min() == 0 and x <= box[0] and y <= box[1] and box[2] <= x + 64 and box[3] <= y + 64
            checked += 1
    assert checked >= 5
    # refused: an existing folder (nothing overwritten), too small a size, a set without known objects
    assert_clean_error(edgeq_here("datasets", "crops", str(scenes), str(out)), str(out), "already exists")
    assert_clean_error(edgeq_here("datasets", "crops", str(scenes), str(tmp_path / "b"), "--size", "16"),
                       "--size 16", "at least 32")
    # root passes access() there, and nothing can be created
    assert_clean_error(edgeq_here("datasets", "crops", str(scenes), "/proc/crops"), "/proc/crops", "cannot write")
    only_unknown = _broken(scenes, tmp_path, lambda d, p: d.update(annotations=[
        a for a in d["annotations"] if a["category_id"] in (6, 9)]))
    assert_clean_error(edgeq_here("datasets", "crops", str(only_unknown), str(tmp_path / "c")),
                       "annotations.json", "no boxes of a known category")
    assert not (tmp_path / "c").exists()


def test_object_crops_of_an_unreadable_image_leave_nothing(scenes, tmp_path):
    from edgeq.converter.data.coco import read_coco

    broken = _broken(scenes, tmp_path, lambda d, p: None)
    coco = read_coco(broken)
    last = next(im for im in reversed(coco.images) if len(coco.boxes[im["id"]]))
    (broken / "images" / last["file_name"]).write_bytes(b"not a png")  # found late: crops were written before it
    assert_clean_error(edgeq_here("datasets", "crops", str(broken), str(tmp_path / "crops")),
                       last["file_name"], "not a readable image")
    assert not (tmp_path / "crops").exists() and not list(tmp_path.glob(".crops*"))
