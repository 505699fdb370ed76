import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipeline.data.sources import EMBEDDED, load_embedded, load_folder, split_by_image

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


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="split fractions"):
        split_by_image({"a": "a"}, 0.6, 0.5, 0)


def test_prepare_stage_on_a_user_folder(tmp_path):
    """The stage itself: odd files converted, bad ones reported by path and reason, never a traceback."""
    files = write_odd_files(tmp_path / "mine", size=72)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(embedded=["astronaut", "coffee", "chelsea"], folders=[str(tmp_path / "mine")])
    params["synthesis"]["eval_crop"] = 64
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
