import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipeline.data.sources import EMBEDDED, load_embedded, load_folder, read_pinned_splits, split_by_image

from .conftest import ROOT
from .images import write_odd_files


def test_embedded_photos_load_without_network():
    images = load_embedded(sorted(EMBEDDED))
    assert len(images) == 12
    for image in images:
        assert image.pixels.dtype == np.uint8 and image.pixels.shape[2] == 3 and min(image.pixels.shape[:2]) >= 300
    retina = next(i for i in images if i.name == "retina")
    assert retina.pixels[:20, :20].mean() > 20, "the retina crop must not keep the black border"
    megapixels = sum(i.pixels.shape[0] * i.pixels.shape[1] for i in images) / 1e6
    assert 4 < megapixels < 6


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="unknown embedded image.*lena"):
        load_embedded(["astronaut", "lena"])


def test_user_folder_converts_what_it_can_and_reports_the_rest(tmp_path):
    files = write_odd_files(tmp_path / "mine")
    images, rejected = load_folder(tmp_path / "mine", min_size=64)
    by_source = {i.source: i for i in images}
    assert set(by_source) == {str(files[k]) for k in ("plain", "gray", "rgba", "rgb16", "gray16")}
    assert by_source[str(files["rgba"])].conversions == ["alpha channel dropped"]
    assert all(i.pixels.dtype == np.uint8 and i.pixels.shape[2] == 3 for i in images)
    reasons = {r.source: r.reason for r in rejected}
    assert set(reasons) == {str(files[k]) for k in ("truncated", "not_image", "other_ext", "tiny")}
    assert "truncated" in reasons[str(files["truncated"])]
    assert "not an image" in reasons[str(files["not_image"])]
    assert "smaller than 64" in reasons[str(files["tiny"])]


def test_missing_user_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "nope", 64)


@pytest.mark.parametrize("n", [3, 12, 40])
def test_split_is_disjoint_by_image_deterministic_and_keeps_scenes_together(n):
    groups = {f"img{i}": f"scene{i // 2}" for i in range(n)}
    split = split_by_image(groups, 0.17, 0.25, seed=5)
    assert split == split_by_image(dict(reversed(groups.items())), 0.17, 0.25, seed=5)
    assert set(split) == set(groups)
    assert {"train", "val", "test"} <= set(split.values()) or n < 6
    for name, scene in groups.items():
        assert all(split[other] == split[name] for other, s in groups.items() if s == scene)


def test_folder_image_names_do_not_depend_on_where_the_folder_lives(tmp_path):
    """Names order the patches and decide the split: the same photos must get them in any checkout."""
    write_odd_files(tmp_path / "a" / "mine")
    write_odd_files(tmp_path / "b" / "c" / "mine")
    here, _ = load_folder(tmp_path / "a" / "mine", min_size=64)
    there, _ = load_folder(tmp_path / "b" / "c" / "mine", min_size=64)
    assert [i.name for i in here] == [i.name for i in there]
    assert all(i.name.startswith("mine_") for i in here) and len({i.name for i in here}) == len(here)


def test_pinned_images_keep_their_split_with_their_scene_and_the_rest_split_by_seed():
    groups = {f"img{i}": f"scene{i // 2}" for i in range(40)}
    free = split_by_image(groups, 0.17, 0.25, seed=5)
    pinned = {"img0": "val", "img7": "test", "absent": "train"}  # names not prepared are ignored
    split = split_by_image(groups, 0.17, 0.25, seed=5, pinned=pinned)
    assert split["img0"] == split["img1"] == "val" and split["img7"] == split["img6"] == "test"
    assert "absent" not in split
    assert split_by_image(groups, 0.17, 0.25, seed=5, pinned=free) == free, "a full pin reproduces its split"


@pytest.mark.parametrize("pinned, match", [
    ({"img0": "holdout"}, "expected one of"),
    ({"img0": "val", "img1": "test"}, "pinned to both"),
])
def test_bad_pins_are_refused(pinned, match):
    with pytest.raises(ValueError, match=match):
        split_by_image({"img0": "s0", "img1": "s0", "img2": "s1"}, 0.17, 0.25, seed=5, pinned=pinned)


def test_pinned_split_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.split.pinned"):
        read_pinned_splits(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"img0": "val"}))
    with pytest.raises(ValueError, match="'splits'"):
        read_pinned_splits(tmp_path / "bad.json")


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="split fractions"):
        split_by_image({"a": "a"}, 0.6, 0.5, 0)


def test_prepare_stage_on_a_user_folder(tmp_path):
    """The stage itself: odd files converted, bad ones reported by path and reason, never a traceback."""
    files = write_odd_files(tmp_path / "mine", size=72)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(embedded=["astronaut", "coffee", "chelsea"], folders=[str(tmp_path / "mine")])
    params["synthesis"]["eval_crop"] = 64
    params["prepare"]["split"]["pinned"] = str(tmp_path / "pinned.json")
    (tmp_path / "pinned.json").write_text(json.dumps({"splits": {"coffee": "test", "chelsea": "train"}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.prepare", "--params", str(tmp_path / "params.yaml"),
         "--out", str(tmp_path / "clean")], cwd=ROOT, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    for key in ("truncated", "not_image", "tiny"):
        assert f"skipped {files[key]}" in run.stderr
    assert f"converted {files['rgb16']}: 16-bit to 8-bit" in run.stderr
    manifest = json.loads((tmp_path / "clean/manifest.json").read_text())
    assert len(manifest["images"]) == 8 and len(manifest["rejected"]) == 4
    for record in manifest["images"]:
        assert (tmp_path / "clean" / record["file"]).is_file()
    assert {r["name"]: r["split"] for r in manifest["images"]}.items() >= {"coffee": "test", "chelsea": "train"}.items()
