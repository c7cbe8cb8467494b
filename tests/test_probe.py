"""Linear probe: recovers a linear signal, ignores noise, and the CLI writes its outputs."""
import json

import pytest
import torch

from igpt.probe import fit_logistic, main as probe_main, probe_all_layers, probe_layer
from igpt.train import main as train_main


def synthetic(n, dim=16, n_classes=4, signal=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g)
    x[:, :n_classes] += signal * torch.nn.functional.one_hot(y, n_classes)  # linearly separable direction per class
    return x, y


def test_probe_recovers_a_linear_signal_and_not_noise():
    x_tr, y_tr = synthetic(800)
    x_te, y_te = synthetic(400, seed=1)
    good = probe_layer(x_tr, y_tr, x_te, y_te, n_classes=4)
    assert good["test_acc"] > 0.9 and good["train_acc"] > 0.9
    noise = probe_layer(torch.randn(800, 16), y_tr, torch.randn(400, 16), y_te, n_classes=4)
    assert noise["test_acc"] < 0.4  # chance is 0.25


def test_best_layer_is_chosen_on_validation_accuracy():
    x_tr, y_tr = synthetic(600)
    x_te, y_te = synthetic(300, seed=1)
    noise_tr, noise_te = torch.randn(600, 16), torch.randn(300, 16)
    result = probe_all_layers(torch.stack([noise_tr, x_tr, noise_tr]), y_tr, torch.stack([noise_te, x_te, noise_te]),
                              y_te, layers=[0, 1, 2], n_classes=4)
    assert result["best_layer"] == 1
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2]


def test_fit_logistic_penalty_shrinks_weights():
    x, y = synthetic(300)
    assert fit_logistic(x, y, 4, l2=1.0).weight.norm() < fit_logistic(x, y, 4, l2=1e-4).weight.norm()


def test_probe_cli(tmp_path):
    run = tmp_path / "run"
    train_main(["--resolution", "8", "--steps", "3", "--batch-size", "4", "--warmup", "1", "--precision", "fp32",
                "--out", str(run)])
    result = probe_main(["--checkpoint", str(run), "--n-train", "60", "--n-test", "30", "--precision", "fp32",
                         "--compare-random-init"])
    saved = json.loads((run / "probe" / "probe.json").read_text())
    assert saved["best_layer"] == result["best_layer"]
    assert [r["layer"] for r in saved["layers"]] == list(range(5))
    assert all(0 <= r["test_acc"] <= 1 for r in saved["layers"]) and "random_init" in saved
    assert (run / "probe" / "probe.png").exists()
    cached = list((run / "probe" / "cache").glob("features-*.safetensors"))
    assert len(cached) == 4  # train/test x pretrained/random
    again = probe_main(["--checkpoint", str(run), "--n-train", "60", "--n-test", "30", "--precision", "fp32"])
    assert again["layers"] == result["layers"]  # the cached features give the same probes
    # any dataset the trainer reads: an imagefolder (labels from the folder names; no test split -> held out)
    from PIL import Image

    folder = tmp_path / "folder"
    for label, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (folder / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (12, 10), (colour[0], colour[1] + 2 * i, colour[2])).save(folder / label / f"{i}.png")
    result = probe_main(["--checkpoint", str(run), "--dataset", f"imagefolder:{folder}", "--n-train", "40",
                         "--n-test", "10", "--precision", "fp32", "--no-cache", "--out", str(tmp_path / "p")])
    assert result["best_test_acc"] >= 0.5  # the two classes differ in colour: trivially separable

    # a dataset without labels: nothing to probe
    import datasets

    unlabelled = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 4},
                                            features=datasets.Features({"image": datasets.Image()}))
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match="no label column"):
        probe_main(["--checkpoint", str(run), "--dataset", str(tmp_path / "unlabelled"), "--no-cache"])


def test_augment_pads_crops_and_flips():
    from igpt.probe import augment

    img = torch.arange(2 * 8 * 8 * 3, dtype=torch.int64).remainder(255).to(torch.uint8).reshape(2, 8, 8, 3) + 1
    out = augment(img, torch.Generator().manual_seed(0))
    assert out.shape == img.shape and out.dtype == torch.uint8
    none = augment(img, torch.Generator().manual_seed(0), pad=0)
    # with no padding the crop is the identity, so each output is the image or its mirror
    for a, b in zip(none, img):
        assert torch.equal(a, b) or torch.equal(a, b.flip(1))


def test_finetune_cli(tmp_path):
    run = tmp_path / "run"
    train_main(["--resolution", "8", "--steps", "2", "--batch-size", "4", "--warmup", "1", "--precision", "fp32",
                "--out", str(run)])
    result = probe_main(["--checkpoint", str(run), "--finetune", "--ft-steps", "3", "--ft-batch-size", "4",
                         "--n-train", "20", "--n-test", "10", "--precision", "fp32"])
    assert 0 <= result["test_acc"] <= 1
    assert json.loads((run / "probe" / "finetune.json").read_text())["steps"] == 3
