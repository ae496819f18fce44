"""Every knob of hnm-ray, declared once: the sections of the one config tree (`TrainConfig`).

    run        the job: cohort, run folder, rounds, seed
    tiling     tile size, level or mpp, tissue fraction; tiling.tissue: tissue detection
    encoder    the tile encoder f: architecture, initial weights, norm, input space
    pretrain   the self-supervised (SimCLR) warm start
    extract    Ray Data extraction resources
    mil        the MIL aggregator: model, losses (BCE + ranking loss), optimiser, Ray Train resources
    mining     pseudo labels -> positives (self-paced) and hard negatives (global top-k), update gate
    finetune   SupCon fine-tuning of the encoder: loop, optimiser, augmentations, Ray Train resources

tiling, encoder, pretrain and extract are declared in `hnm_ray.config.tile_sections`.

The paper's official values are the recipe `hnm_ray/config/recipes/paper.yaml` (`--recipe paper`).
"""
from __future__ import annotations

from dataclasses import dataclass

from hnm_ray.config.tile_sections import EncoderConfig, ExtractConfig, PretrainConfig, TilingConfig
from hnm_ray.config.tree import knob, section
from hnm_ray.core.errors import ConfigError

# Not a knob: only the command line can give it, never a file (README "Which files must come from someone you trust").
TRUST_PLUGINS_FLAG = "--trust-plugins"
TRUST_PLUGINS_HELP = ("run TorchScript encoders and module:callable plug-ins that a file names (--config, a --recipe "
                      "file, a resumed run's or a checkpoint's config.yaml, aggregator.json); without it such a file "
                      "may name registered encoders/aggregators only. Give it only for files from someone you trust")

EMBED_AUTO_WIDTH = 128
EMBED_AUTO_MIN_BAGS = 100
STANDARDIZE_AUTO_SPREAD = 10.0  # max / median per-feature std above which mil.standardize auto z-scores each feature


@dataclass
class MILConfig:
    """MIL aggregator: model, losses (bag/instance BCE + ranking loss), optimiser, Ray Train resources."""

    aggregator: str = knob("dsmil", "aggregator: dsmil, dsmil_its2clr (the official variant), abmil, or "
                                    "module:callable (from a file only with --trust-plugins)", code=True)
    hidden: int = knob(128, "aggregator hidden (query) size", low=1)
    embed: int | None = knob(None, "width of a Linear + ReLU instance embedding learnt in front of the aggregator "
                                   "(0: none, the standardised features go in as they are). Unset (auto): "
                                   f"{EMBED_AUTO_WIDTH} when the training split has at least {EMBED_AUTO_MIN_BAGS} "
                                   "labelled slides, else 0, resolved at the job's start and recorded in its "
                                   "config.yaml (measured: better on cohorts of hundreds of slides, worse on tens: "
                                   "benchmarks/README 'mil.embed auto')", low=0)
    instance_head: str = knob("shared", "what the instance head's losses (max-instance BCE, ranking) train with "
                                        "mil.embed > 0: shared (the embedding too, as the bag loss does) or detached "
                                        "(the instance head alone on the embedding detached, which then learns from "
                                        "the bag loss only, attention MIL's; the scores are computed the same way). "
                                        "No effect without an embedding. detached suits jobs without rounds (MUSK1 "
                                        "ABMIL 0.852 -> 0.876); with rounds it lowered the instance AUC mining reads "
                                        "and once inverted it (benchmarks/README 'The instance head's losses')",
                             choices=["shared", "detached"])
    dropout: float = knob(0.0, "aggregator dropout", low=0.0, high=1.0, high_open=True)
    epochs: int = knob(40, "aggregator training epochs per round", low=1)
    lr: float = knob(1e-3, "Adam learning rate (official 2e-4; 1e-3 measured better on small cohorts)",
                     low=0.0, low_open=True)
    weight_decay: float = knob(1e-4, "Adam weight decay", low=0.0)
    lr_schedule: str = knob("constant", "learning-rate schedule: constant, cosine (to 0 at the last epoch), or "
                                        "mil_step_official (StepLR(75, 0.5) stepped twice per epoch)",
                            choices=["constant", "cosine", "mil_step_official"])
    standardize: str = knob("auto", "feature standardisation inside the aggregator: shared (centre each feature, "
                                    "divide all by one scale, the RMS of their stds), per_feature (z-score each "
                                    "feature), auto (per_feature when the training features' stds spread more than "
                                    f"{STANDARDIZE_AUTO_SPREAD:g}x, max / median, as hand-made features in different "
                                    "units do; else shared, as encoder features and pixels: benchmarks/README "
                                    "'mil.standardize auto'), none (official)",
                            choices=["auto", "shared", "per_feature", "none"])
    bce_weight: str = knob("pos_weight", "class balance of the BCE terms: pos_weight (#neg/#pos on positive bags) "
                                         "or uniform (official: the ratio passed positionally scales every term)",
                           choices=["pos_weight", "uniform"])
    w_bag: float = knob(0.5, "weight of the bag BCE term", low=0.0)
    w_ins: float = knob(0.5, "weight of the max-instance BCE term", low=0.0)
    w_rank: float = knob(0.1, "weight of the multiple instance ranking loss (0 disables it)", low=0.0)
    margin: float = knob(1.0, "ranking-loss margin between positive and negative top-k logits", low=0.0)
    rank_k: int = knob(10, "k of the top-k mean in the ranking loss", low=1)
    ranking: str = knob("pair", "ranking form: pair (paper), global (vs the miner's hard negatives), none",
                        choices=["pair", "global", "none"])
    global_pool: int = knob(512, "hard negatives sampled from the miner per epoch for the global ranking form", low=1)
    select_epoch: str = knob("best_val", "the epoch whose model scores tiles and is reported: best_val (best "
                                         "validation AUC) or fixed (fixed_epoch, as the official code)",
                             choices=["best_val", "fixed"])
    fixed_epoch: int = knob(-1, "the epoch kept with select_epoch fixed (-1: the last)", low=-1)
    min_val_bags: int = knob(10, "the fewest validation bags of each class to pick the epoch (best_val) and the "
                                 "threshold (Youden) on; with fewer, fixed_epoch and threshold 0.5 are used (on ~15 "
                                 "validation bags both were noise: benchmarks/results/classic_mil.json)", low=0)
    ensemble: int = knob(5, "aggregators trained per round (seeds run.seed, run.seed + 1, ...) whose instance and bag "
                            "logits are averaged into the round's model, its threshold picked on validation afresh "
                            "(5: round-0 test slide AUC 0.772 -> 0.821 on the Camelyon16-regime cohort, benchmarks/"
                            "README 'Aggregator ensembles'; 1: one aggregator, the official code's); each costs one "
                            "more MIL training; with workers 0 and Ray up (not in a tune trial) they "
                            "train at once, one Ray task each (cpus_per_worker CPUs, a GPU with use_gpu), as many as "
                            "the cluster has room for", low=1)
    workers: int = knob(0, "Ray Train workers; 0 (default): in the driver process, without Ray Train: the "
                           "aggregator is small, and a worker group costs ~15 s to start per round on 2 CPUs "
                           "(benchmarks/results/job.json); N: DDP workers, restarted by FailureConfig on a lost node",
                        low=0)
    cpus_per_worker: float = knob(1.0, "CPUs per training worker, and its torch threads (also of the driver with "
                                       "workers 0)", low=0.0, low_open=True)
    use_gpu: bool = knob(False, "train on GPUs")
    pairs_per_step: int = knob(1, "bag pairs whose gradients are accumulated per optimiser step (1: the paper's; "
                                  "more cuts DDP all-reduces)", low=1)
    bag_cache_gib: float = knob(0.5, "GiB of bags (features as stored: float16 for a float16 store, widened per use) "
                                     "each MIL worker keeps in memory between reads: "
                                     "bags are read from the store when a pair, validation or test needs them, the "
                                     "first that fit are kept, the rest re-read each epoch (~0.03 s per 2k x 512 "
                                     "bag, benchmarks/README); a cohort within it is read once. 0: read every bag "
                                     "every time",
                                low=0.0)
    max_bag_gib: float = knob(0.25, "largest bag (float32 features: tiles x dim x 4 bytes) MIL training takes: a bag "
                                     "is held whole (attention is over all its tiles) and a training pair peaks at "
                                     "~7-13x one bag's size (benchmarks/README), so a larger bag stops the stage "
                                     "before training with an error naming it instead of a worker killed for memory "
                                     "(0.25: 128k x 512 or 64k x 1,024 tiles, 3x Camelyon16's largest)",
                              low=0.0, low_open=True)
    eval_chunk_tiles: int = knob(8192, "scoring without gradients (validation, test, tile scores, heatmaps, mining), "
                                       "a bag of more tiles goes through the aggregator this many tiles at a time, "
                                       "so its intermediates are held for one chunk (the logits equal the whole "
                                       "bag's to float rounding; saved with the model; predict takes its own). 0: whole "
                                       "bags", low=0)
    read_ahead: int = knob(0, "bags each MIL worker reads ahead in a background thread while it computes on the "
                              "ones in hand (2: the next pair), for a node with a core to spare; each costs one more "
                              "bag of memory. 0 (default): read in the loop; on a busy 2-core node 2 measured "
                              "0.98-1.2x the epoch time (benchmarks/results/mil_epoch.json)", low=0)
    checkpoint_every: int = knob(5, "checkpoint every N epochs (and at the last epoch)", low=1)
    max_failures: int = knob(2, "Ray Train restarts from the last checkpoint after a worker failure", low=0)

    def resolved_embed(self, train_bags: int) -> int:
        """mil.embed as given, or unset (auto) EMBED_AUTO_WIDTH from EMBED_AUTO_MIN_BAGS labelled training slides
        (`train_bags`) on, else 0."""
        if self.embed is not None:
            return self.embed
        return EMBED_AUTO_WIDTH if train_bags >= EMBED_AUTO_MIN_BAGS else 0


@dataclass
class MiningConfig:
    """Pseudo labels -> self-paced positives and the global top-k hard negatives; which round's labels are used."""

    neg_ratio: float = knob(0.2, "hard negative mining ratio: the global top fraction of negative-slide tiles kept "
                                 "(the paper's headline setting: 0.05)", low=0.0, high=1.0, low_open=True)
    threshold: float = knob(0.3, "pseudo-label probability above which a positive-slide tile may be a positive "
                                 "(at or below it: an uncertain negative)", low=0.0, high=1.0)
    ro: float = knob(0.2, "self-paced positive ratio r_t at the end of warm-up", low=0.0, high=1.0)
    rT: float = knob(0.8, "self-paced positive ratio r_t at the last epoch", low=0.0, high=1.0)
    min_positives: int = knob(50, "the fewest positives a fine-tuning epoch draws from (our loop and the adapter): "
                                  "r_t's top fraction of those above the threshold, but at least this many of them "
                                  "(all when fewer; 0: r_t alone, the paper's). On a small cohort r_t 0.2 of a few "
                                  "dozen left ~10 tiles, each repeated ~150 times a round, and the round fell; 50 "
                                  "raised the tumour-9 sibling's final slide AUC +0.058 (benchmarks/README)", low=0)
    pool: str = knob("train", "slides pseudo-labelled and mined: train, or train_val (official)",
                     choices=["train", "train_val"])
    uncertain_negatives: bool = knob(False, "add positive-slide tiles with p <= threshold (the lowest r_t fraction) "
                                            "as negatives in fine-tuning step B (official: on)")
    update_gate: bool = knob(False, "adopt a round's pseudo labels and hard negatives only when its best validation "
                                    "F1 is not worse than the best so far (official: on)")

    def validate(self) -> None:
        """r_t grows: rT >= ro."""
        if self.rT < self.ro:
            raise ConfigError("mining.rT", f"{self.rT} must be >= mining.ro = {self.ro}")


@dataclass
class FinetuneConfig:
    """Encoder fine-tuning on hard negatives and self-paced positives (ItS2CLR; finetune.objective: the loss)."""

    scope: str = knob("full", "what a round fine-tunes: full (the encoder end to end, then every tile re-extracted "
                              "from the slides: the paper's) or adapter (the encoder stays frozen and round 0's "
                              "features are extracted once; each round trains a small adapter on the stored features "
                              "of the same rows with the same loss (finetune.objective), and the next round's "
                              "features are adapter(round 0's): no slide is read after round 0. For foundation-model "
                              "encoders and imported features; a round costs seconds)", choices=["full", "adapter"])
    adapter_hidden: int = knob(256, "adapter scope: hidden width h of the residual adapter x + W2 relu(W1 x) "
                                    "(D -> h -> D; W2 starts at zero, so round 1 starts from round 0's features)",
                               low=1)
    adapter_dropout: float = knob(0.2, "adapter scope: feature dropout of each SupCon view (the two views of a tile "
                                       "are feature-space augmentations of its stored features)",
                                  low=0.0, high=1.0, high_open=True)
    adapter_noise: float = knob(0.2, "adapter scope: Gaussian noise added to each view, in units of each feature's "
                                     "std over the round's rows", low=0.0)
    epochs_per_round: int = knob(2, "fine-tuning epochs between re-extractions (mil_every_n_epochs)", low=1)
    warmup_epochs: int = knob(1, "epochs before positives act as anchors (step B) and r_t starts growing", low=0)
    loop: str = knob("ours", "fine-tuning loop: ours (one SupCon step per batch, step B added after warm-up) or "
                             "official (two SGD steps per iteration from two streams, A: hard negatives + positives "
                             "above the threshold, B: negatives + top-r_t positives; 2N-view mean)",
                     choices=["ours", "official"])
    optimizer: str = knob("adam", "fine-tuning optimiser: adam (its step size adapts per weight: on the "
                                  "Camelyon16-regime cohort SGD at 0.01 did not fit the rows' labels in a round, Adam "
                                  "at 1e-3 did: benchmarks/README) or sgd (the official; finetune.momentum)",
                          choices=["adam", "sgd"])
    lr: float | None = knob(None, "learning rate; default: 0.01 with sgd (official), 1e-3 with adam",
                            low=0.0, low_open=True)
    momentum: float = knob(0.0, "SGD momentum (0: official; 0.9 collapsed the projection and lowered the tile probe "
                                "0.943 -> 0.842 in a round on the Camelyon16-regime cohort: benchmarks/README)",
                           low=0.0, high=1.0, high_open=True)
    weight_decay: float = knob(1e-4, "SGD weight decay", low=0.0)
    schedule: str = knob("cosine", "learning-rate schedule over all fine-tuning epochs: cosine, or cosine_official "
                                   "(held for 10 epochs, then cosine)", choices=["cosine", "cosine_official"])
    batch_size: int = knob(64, "tiles per batch, two views each: per worker in our loop; in the official loop the "
                               "step's batch over all workers, split between them (official 512)", low=2)
    step_a_positive_fraction: float = knob(0.2, "official loop: step A = int(B (1 - f)) hard negatives + int(B f) "
                                                "positives (409 + 102 at B = 512)",
                                           low=0.0, high=1.0, low_open=True, high_open=True)
    step_b_positive_fraction: float = knob(0.05, "official loop: step B = int(B (1 - f)) negatives + int(B f) "
                                                 "top-r_t positives (486 + 25 at B = 512)",
                                           low=0.0, high=1.0, low_open=True, high_open=True)
    temperature: float = knob(0.07, "SupCon temperature (also the bce objective's: logits = cos / temperature)",
                              low=0.0, low_open=True)
    objective: str = knob("bce", "our loop's loss on the rows' pseudo labels (the official loop's steps are always "
                                 "SupCon): bce (binary cross-entropy of the "
                                 "labels on the projection, a cosine classifier with a fixed prototype: no weight "
                                 "added), supcon (the paper's) or supcon_bce (their sum). On the Camelyon16-regime "
                                 "cohort SupCon collapsed the projection even on true labels; bce raised the tile "
                                 "probe in one round: benchmarks/README", choices=["bce", "supcon", "supcon_bce"])
    negative_classes: int = knob(1, "our loop: SupCon classes of the negatives: 1 (the paper: every negative is a "
                                    "positive of every other) or K > 1, the negatives split into K k-means clusters "
                                    "of their current features, so that SupCon does not pull all normal tissue into "
                                    "one point (it collapsed the projection on the Camelyon16-regime cohort: "
                                    "benchmarks/README)", low=1)
    proj_dim: int = knob(256, "projection head output size", low=1)
    orientations: str = knob("none", "which orientations our augmentations give a view, in the warm start and "
                                     "fine-tuning: none (the tile as it lies: on the Camelyon16-regime cohorts flips "
                                     "and turns kept the fine-tuning from fitting its labels, and a 6 turned twice is a "
                                     "9: benchmarks/README), hflip (a horizontal flip, as the official SimCLR set), or "
                                     "dihedral (the 8 flips and 90-degree turns: for tissue whose orientation carries "
                                     "no class)", choices=["none", "hflip", "dihedral"])
    augment: str = knob("ours", "augmentations: ours (crop 0.5-1, finetune.orientations, colour jitter 0.6) or "
                                "official (crop 0.08-1, flip, strong jitter, grayscale, blur; kornia)",
                        choices=["ours", "official"])
    pos_per_neg: float = knob(1.0, "our loop: positives streamed per hard negative in an epoch (an epoch iterates over "
                                   "the hard negatives, so its cost scales with neg_ratio)", low=0.0, low_open=True)
    workers: int | None = knob(None, "Ray Train workers; 0: in the driver process, without Ray Train (no ~10 s "
                                      "worker-group start per round, no restart after a lost node); default: with "
                                      "use_gpu one per GPU of the cluster (split over a sweep's concurrent trials), "
                                      "else 0 on a one-node cluster (a laptop), else 1", low=0)
    cpus_per_worker: float | None = knob(None, "CPUs per worker (also its torch threads); default: with use_gpu the "
                                               "CPUs per GPU of the smallest GPU node, else the cluster's CPUs split "
                                               "over the workers, at most one node's (all cores on a laptop)",
                                         low=0.0, low_open=True)
    use_gpu: bool = knob(False, "fine-tune on GPUs")
    decode_threads: int = knob(1, "cuCIM decode threads in each worker (the next batch is decoded while one trains)", low=1)
    open_slides: int = knob(256, "slide readers each worker keeps open (at most its share's slides and what the "
                                 "open-file limit allows, 3 files a reader): a batch draws its tiles from many slides "
                                 "at random, so with fewer open most batches re-open their slides (4 open on the "
                                 "Camelyon16-regime cohort's 270 slides: decoding ~4x slower, benchmarks/README)",
                            low=1)
    max_failures: int = knob(2, "Ray Train restarts from the last checkpoint after a worker failure", low=0)

    def validate(self) -> None:
        """Negative classes are a rule of our loop's loss; the official loop's steps have their own."""
        if self.negative_classes > 1 and self.loop != "ours":
            raise ConfigError("finetune.negative_classes", f"{self.negative_classes} applies to --finetune.loop ours; "
                                                           f"with loop {self.loop} set it to 1")

    def step_lr(self) -> float:
        """The learning rate: finetune.lr, or the optimiser's default (sgd 0.01, adam 1e-3)."""
        return self.lr if self.lr is not None else (1e-3 if self.optimizer == "adam" else 0.01)


@dataclass
class JobConfig:
    """The job: cohort, run folder, rounds and seed."""

    name: str = knob("", "run name (default: hnm-<date>-<time>); outputs go to <runs_dir>/<name>")
    overwrite: bool = knob(False, "start afresh in <runs_dir>/<name> when it already holds a run, deleting that run "
                                  "(without it a taken name is refused: --resume the run or pick another name)")
    runs_dir: str = knob("runs", "folder (or s3:// / gs:// URI) of run folders")
    manifest: str = knob("", "slide manifest (CSV/Parquet: slide_id, path, label[, split, annotation]); empty: the "
                             "built-in demo cohort")
    demo_dir: str = knob("", "where the demo cohort is cached (default: $HNM_RAY_CACHE or ~/.cache/hnm_ray)")
    demo_slides: int = knob(80, "slides in the demo cohort (a quarter of them test slides, half of those tumour)",
                            low=4)
    demo_size: int = knob(2048, "level-0 side of demo slides in pixels", low=512)
    store: str = knob("", "feature store root of round 0, a folder or s3:// / gs:// URI (default: <run>/features); "
                          "shareable between runs")
    store_tag: str = knob("", "round 0's folder in the store (default: derived from the encoder and its weights); "
                              "the --tag of an `import_features` store to train on imported features (with "
                              "--finetune.scope adapter: no slide is read); a folder holding features of another "
                              "encoder, preprocessing or tiling is refused")
    rounds: int = knob(2, "fine-tuning rounds (the aggregator is trained rounds + 1 times)", low=0)
    heatmaps: int = knob(4, "test slides to draw tile-score heatmaps for (tumour and normal in turn)", low=0)
    final_round: str = knob("best_val", "the round whose aggregator and encoder are the run's final model "
                                        "(checkpoint, metrics.json final, heatmaps, QuPath, predict): best_val (the "
                                        "best validation slide AUC, ties to the later round; never test) or last",
                            choices=["best_val", "last"])
    tracking: str = knob("none", "experiment tracking: none, or mlflow (config as params, per-round metrics with the "
                                 "round as step, report/ROC/heatmaps as artifacts; install hnm-ray[tracking])",
                         choices=["none", "mlflow"])
    tracking_uri: str = knob("", "MLflow tracking URI: a folder (a local file store, no server), sqlite:///FILE or "
                                 "http://HOST:PORT; empty: <runs_dir>/mlruns. Credentials: MLFLOW_TRACKING_USERNAME/"
                                 "PASSWORD in the environment (a password in the URI is masked in every file we write)")
    seed: int = knob(0, "seed of splits, init, pairing, sampling and augmentations")
    verbose: bool = knob(False, "show Ray's own INFO lines on the console (always in <run>/ray.log)")

    def validate(self) -> None:
        """run.name is one folder name inside runs_dir: no path separators, not `.` or `..`."""
        if any(c in self.name for c in "/\\\0") or self.name in (".", ".."):
            raise ConfigError("run.name", f"{self.name!r} must be a single folder name (no '/', '\\', '.' or '..'); "
                                          "put the folder it goes in into run.runs_dir")


@dataclass
class TrainConfig:
    """All knobs of hnm-ray: one tree, one YAML, one flag per knob (`--section.knob`)."""

    run: JobConfig = section(JobConfig, "the job: cohort, run folder, rounds, seed")
    tiling: TilingConfig = section(TilingConfig, "tiling and tissue detection")
    encoder: EncoderConfig = section(EncoderConfig, "the tile encoder")
    pretrain: PretrainConfig = section(PretrainConfig, "self-supervised warm start of the encoder")
    extract: ExtractConfig = section(ExtractConfig, "feature extraction (Ray Data) resources")
    mil: MILConfig = section(MILConfig, "MIL aggregator training (Ray Train) and the ranking loss")
    mining: MiningConfig = section(MiningConfig, "pseudo labels, positives and hard negative mining")
    finetune: FinetuneConfig = section(FinetuneConfig, "SupCon fine-tuning of the encoder (Ray Train)")

    def validate(self) -> None:
        """Warm-up must end before the last fine-tuning epoch."""
        total = self.run.rounds * self.finetune.epochs_per_round
        if total and self.finetune.warmup_epochs >= total:
            raise ConfigError("finetune.warmup_epochs", f"{self.finetune.warmup_epochs} must be below run.rounds * "
                              f"finetune.epochs_per_round = {total}; lower it or train more epochs")

    @property
    def total_finetune_epochs(self) -> int:
        """Fine-tuning epochs over all rounds (the length of the cosine and r_t schedules)."""
        return max(1, self.run.rounds * self.finetune.epochs_per_round)
