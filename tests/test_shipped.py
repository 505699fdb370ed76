"""The shipped models (weights/): which set `uir` uses, `uir ship`, the backbone's model card, and a restore
from a fresh clone before any `dvc repro`."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.models import folder
from pipeline.models.folder import SHIPPED, resolve_models

from .images import rgb
from .test_restore import _run_cli as _cli


def test_the_last_dvc_repro_takes_precedence_over_the_shipped_set(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(folder, "SHIPPED", tiny_models)
    assert resolve_models("elsewhere") == tmp_path.joinpath("elsewhere").relative_to(tmp_path)
    assert resolve_models(None) == tiny_models, "no models/: the shipped set"
    shutil.copytree(tiny_models / "backbone", tmp_path / "models" / "backbone")
    assert resolve_models(None) == tiny_models, "an incomplete models/ (no router) is not used"
    shutil.copytree(tiny_models / "router", tmp_path / "models" / "router")
    assert str(resolve_models(None)) == "models"
    monkeypatch.setattr(folder, "SHIPPED", tmp_path / "absent")
    shutil.rmtree(tmp_path / "models")
    assert str(resolve_models(None)) == "models", "nothing shipped: models/, whose checks name the stage to run"


def test_uir_ship_copies_adapters_and_router_trained_on_the_shipped_backbone(tmp_path, tiny_models, capsys):
    target, trained = tmp_path / "shipped", tmp_path / "models"
    shutil.copytree(tiny_models, trained)
    shutil.copytree(tiny_models / "backbone", target / "backbone")
    (target / "backbone_split.json").write_text(json.dumps({"splits": {"a": "train"}}))  # a recipe's pinned split
    (trained / "restoration.json").write_text(json.dumps({"policy": "gated"}))
    reports = tmp_path / "reports"
    (reports / "train_lora").mkdir(parents=True)
    (reports / "train_lora" / "noise.json").write_text(json.dumps({"rank": 2, "t_star": 200, "val/psnr": 27.5,
                                                                    "val/input_psnr": 20.1}))
    (reports / "wandb").mkdir()
    (reports / "wandb" / "train_lora@noise.json").write_text(json.dumps({"run_id": "abc123", "mode": "offline"}))
    (tmp_path / "params.yaml").write_text("profile_name: pretrain_adapters\nseed: 1\n")
    clean = tmp_path / "clean"
    clean.mkdir()
    Image.fromarray(rgb(16, 16, seed=0)).save(clean / "a.png")
    (clean / "manifest.json").write_text(json.dumps({"images": [{"name": "a", "file": "a.png", "source": "/photos/a.jpg",
                                                                 "split": "train", "width": 16, "height": 16}]}))
    code, out, _ = _cli(["ship", "--models", str(trained), "--to", str(target), "--reports", str(reports),
                         "--params", str(tmp_path / "params.yaml"), "--clean", str(clean)], capsys)
    assert code == 0, out
    assert sorted(p.name for p in (target / "loras").iterdir()) == ["blur", "noise"]
    assert (target / "router" / "config.json").is_file() and (target / "restoration.json").is_file()
    card = (target / "README.md").read_text()
    assert "| noise | 2 | 200 (fixed) | 20.10 | 27.50 | `abc123` (offline) |" in card
    from pipeline.models.card import data_digest

    for needle in ("profile `pretrain_adapters`", "make params ARGS=profile=pretrain_adapters\nmake repro",
                   "`/photos` 1", data_digest(clean)["sha256"]):
        assert needle in card, needle
    assert json.loads((target / "backbone_split.json").read_text()) == {"splits": {"a": "train"}}, "kept"
    assert "Beside them: `backbone_split.json`, the train / val / test splits" in card
    code, out, _ = _cli(["info", "--models", str(target), "--json"], capsys)
    assert code == 0 and set(json.loads(out)["adapters"]) == {"noise", "blur"}


def test_uir_ship_keeps_the_shipped_router_and_its_card_when_the_run_used_it(tmp_path, tiny_models, capsys):
    target, trained = tmp_path / "shipped", tmp_path / "models"
    shutil.copytree(tiny_models, trained)
    (trained / "restoration.json").write_text(json.dumps({"policy": "gated"}))
    shutil.copytree(tiny_models / "backbone", target / "backbone")
    shutil.copytree(tiny_models / "router", target / "router")
    (target / "router" / "README.md").write_text("# the router's own card\n")
    (trained / "router" / "README.md").write_text("# the router's own card\n\n## Validated again: here\n")
    code, out, _ = _cli(["ship", "--models", str(trained), "--to", str(target), "--reports", str(tmp_path)], capsys)
    assert code == 0 and "the router there is the one it used" in out
    assert (target / "router" / "README.md").read_text() == "# the router's own card\n"
    assert (target / "loras" / "noise" / "adapter_model.safetensors").is_file()

    # the run calibrated the router's known threshold: the shipped router takes it, its card says so, once
    config = json.loads((trained / "router" / "config.json").read_text())
    (trained / "router" / "config.json").write_text(json.dumps({**config, "known_threshold": 0.66}))
    for _ in range(2):
        code, out, _ = _cli(["ship", "--models", str(trained), "--to", str(target), "--reports", str(tmp_path)], capsys)
        assert code == 0 and "the router there is the one it used" in out
    assert json.loads((target / "router" / "config.json").read_text())["known_threshold"] == 0.66
    card = (target / "router" / "README.md").read_text()
    assert card.startswith("# the router's own card\n") and card.count("known threshold") == 1 and "0.66" in card


def test_uir_ship_refuses_adapters_trained_on_another_backbone(tmp_path, tiny_models, capsys):
    import torch

    from pipeline.models.backbone import load_backbone, save_backbone

    unet, scheduler = load_backbone(tiny_models / "backbone")
    with torch.no_grad():
        next(unet.parameters()).add_(1)
    save_backbone(tmp_path / "shipped" / "backbone", unet, scheduler)
    code, _, err = _cli(["ship", "--models", str(tiny_models), "--to", str(tmp_path / "shipped")], capsys)
    assert "is not the backbone" in str(code)
    assert not (tmp_path / "shipped" / "loras").exists(), "nothing copied"


@pytest.mark.parametrize("card", sorted(SHIPPED.rglob("README.md")), ids=lambda p: str(p.relative_to(SHIPPED)))
def test_every_shipped_model_card_has_a_title_and_any_front_matter_is_plain_yaml(card):
    import yaml

    text = card.read_text()
    if text.startswith("---\n"):
        front = yaml.safe_load(text.split("---\n")[1])
        assert isinstance(front, dict), "front matter is a mapping"
        text = text.split("---\n", 2)[2]
    assert text.lstrip().startswith("# "), "a title first"
    assert "[More Information Needed]" not in text, "not a template"


def test_a_trained_backbone_carries_its_model_card(tmp_path):
    from pipeline.models.card import append_validation, backbone_card, data_digest

    clean = tmp_path / "clean"
    clean.mkdir()
    records = []
    for i, split in enumerate(["train", "train", "val"]):
        Image.fromarray(rgb(16, 16, seed=i)).save(clean / f"{i}.png")
        records.append({"name": str(i), "file": f"{i}.png", "source": f"/photos/{i}.jpg" if i else "embedded:coffee",
                        "split": split, "width": 16, "height": 16})
    (clean / "manifest.json").write_text(json.dumps({"images": records}))
    digest = data_digest(clean)
    assert digest["images"] == 2 and digest["sources"] == {"embedded": 1, "/photos": 1}
    (clean / "1.png").write_bytes((clean / "0.png").read_bytes())
    assert data_digest(clean)["sha256"] != digest["sha256"], "the hash covers the pixels"
    card = backbone_card({"block_out_channels": [16, 32]}, {"batch_size": 16, "patch_size": 48, "lr": 6e-4,
                                                           "warmup_steps": 40, "ema_decay": 0.995},
                         620275, 800, 180.0, {"val/psnr_sigma25": 28.32}, digest, {"run_id": "abc123", "project": "p",
                                                                                  "mode": "offline"}, "python -m x")
    for needle in ("0.62 M parameters", digest["sha256"], "steps: 800", "3.0 min", "`abc123`", "| psnr_sigma25 | 28.32 |",
                   "python -m x", "block_out_channels"):
        assert needle in card
    assert "| val/psnr_sigma25 | 28.40 |" in append_validation(card, {"val/psnr_sigma25": 28.4}, "here")


def test_a_trained_router_carries_its_model_card():
    from pipeline.models.card import append_validation, router_card

    digest = {"split": "train", "images": 324, "megapixels": 50.0, "sources": {"/data/CBSD432": 324}, "sha256": "f" * 64}
    train = {"batch_size": 32, "lr": 0.002, "weight_decay": 1e-4, "warmup_steps": 30, "mixed_patches": 12288}
    card = router_card({"names": ["noise", "jpeg"], "width": 16, "mix_threshold": 0.42}, train, 72694, 24000, 1800.0,
                       {"val/top1_accuracy": 0.9712, "false_mix_rate": 0.0104, "parameters": 72694}, digest,
                       {"run_id": "r1", "project": "p", "mode": "offline"}, "dvc exp run fit_router -S profile=x")
    for needle in ("72.7 k parameters", "`noise, jpeg`", "f" * 64, "/data/CBSD432`: 324", "steps: 24000", "30.0 min",
                   "`r1`", "| val/top1_accuracy | 0.971 |", "| false_mix_rate | 0.010 |", '"mix_threshold": 0.42',
                   "dvc exp run fit_router -S profile=x"):
        assert needle in card
    assert "| parameters |" not in card
    again = append_validation(card, {"val/top1_accuracy": 0.9, "false_mix_rate": 0.05, "threshold": 0.3}, "here", digits=3)
    assert again.startswith(card.rstrip()) and "| val/top1_accuracy | 0.900 |" in again and "| false_mix_rate | 0.050 |" in again


@pytest.mark.skipif(not (SHIPPED / "router" / "config.json").is_file(), reason="no shipped models in this checkout")
def test_a_fresh_clone_restores_with_the_shipped_models_before_any_dvc_repro(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no models/ here: as in a fresh clone
    image = rgb(48, 64, seed=3)
    Image.fromarray(image).save(tmp_path / "a.png")
    code, out, err = _cli(["restore", "a.png", "-o", "out", "--engine", "torch"], capsys)
    assert code == 0, err
    assert "using the shipped models" in err
    restored = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert restored.shape == image.shape and restored.dtype == np.uint8
    code, out, _ = _cli(["info", "--json"], capsys)
    assert json.loads(out)["models"]["set"] == "shipped with the package"
