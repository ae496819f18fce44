"""What a finished run leaves for users: checkpoint/ (model files + config + meta), metrics.json, ROC, heatmaps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hnm_ray.config import TrainConfig
from hnm_ray.run_folder import CONFIG_FILE
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord

AGGREGATOR = "aggregator"


def write_checkpoint(run_dir: Path, last: dict[str, Any], config: TrainConfig) -> Path:
    """checkpoint/: aggregator (safetensors + JSON), encoder weights, the run's config tree and meta.json."""
    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    source = Path(last["model_path"]).with_suffix("")
    for suffix in (".safetensors", ".json"):
        shutil.copy(source.with_name(source.name + suffix), checkpoint / f"{AGGREGATOR}{suffix}")
    if last.get("encoder_weights"):
        shutil.copy(last["encoder_weights"], checkpoint / "encoder.pt")
    shutil.copy(run_dir / CONFIG_FILE, checkpoint / CONFIG_FILE)
    (checkpoint / "meta.json").write_text(json.dumps({
        "encoder_weights": "encoder.pt" if last.get("encoder_weights") else None,
        "threshold": last.get("val_threshold", 0.5), "seed": config.run.seed, "round": last["round"]}, indent=2))
    return checkpoint


def finish(run_dir: Path, history: list[dict[str, Any]], records: list[SlideRecord], store: FeatureStore,
           finetune: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """Final checkpoint folder, ROC plot and heatmaps of the last round; the metrics summary (both protocols)."""
    from hnm_ray.inference import split_probabilities
    from hnm_ray.predict import draw_heatmaps
    from hnm_ray.report import plot_roc

    last = history[-1]
    checkpoint = write_checkpoint(run_dir, last, config)
    model = checkpoint / AGGREGATOR
    labels, probs, test_ids = split_probabilities(model, store, records, "test")
    plot_roc(labels, probs, run_dir / "roc.png", title=f"test ROC, round {last['round']}")
    chosen = [r for r in records if r.slide_id in set(test_ids)][: config.run.heatmaps]
    draw_heatmaps(model, store, chosen, run_dir / "heatmaps")
    ours = {k: v for k, v in last.items() if k not in ("model_path", "encoder_weights", "official_protocol")}
    return {"final": ours, "official_protocol": last.get("official_protocol"), "rounds": history,
            "finetune": finetune,
            "protocols": {"final": "ours: MIL epoch and Youden threshold picked on validation, applied to test",
                          "official_protocol": "the official code's: best test slide AUC over MIL epochs, Youden "
                                               "threshold on test (optimistic; for comparison with the paper only)"}}
