"""Feature stores, tile indexes and run folders on object storage, against a real S3 HTTP server (moto's server mode):
round trip, extraction and resume, a writer killed mid-upload, and a train job with --runs-dir/--store s3://."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from _support import small_config, store_for  # noqa: E402

from hnm_ray.core import storage  # noqa: E402
from hnm_ray.core.errors import ConfigError, StoreError  # noqa: E402
from hnm_ray.store.features import FeatureStore  # noqa: E402

BUCKET = "hnm"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Set at import (collection), before the shared Ray session starts: Ray workers inherit the driver's environment
# when Ray is started, as they do under `python -m hnm_ray.train`, so read tasks and actors reach the same server.
ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update({"AWS_ENDPOINT_URL": ENDPOINT, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"})


@pytest.fixture(scope="module")
def s3():
    """One moto S3 server for the module, with an empty bucket; a boto3 client to look behind pyarrow's back."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=int(ENDPOINT.rsplit(":", 1)[1]), verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=ENDPOINT)
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _tiles(n: int) -> pa.Table:
    ids = np.arange(n, dtype=np.int32)
    return pa.table({"tile_id": ids, "x": ids * 224, "y": np.zeros(n, np.int32), "level": np.zeros(n, np.int8),
                     "size": np.full(n, 224, np.int16)})


def test_feature_store_and_tile_index_round_trip_on_s3(s3):
    store = FeatureStore(f"s3://{BUCKET}/roundtrip/features", "small_cnn-abc123", round=1)
    assert store.completed() == set() and store.errors() == []
    store.ensure_writable()
    emb = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    path = store.write_slide("a", _tiles(6), emb, np.array([1, 0, -1, 1, 0, 0], np.int8), {"tile_size": 224})
    store.write_slide("b", _tiles(3), emb[:3])
    assert path == f"s3://{BUCKET}/roundtrip/features/small_cnn-abc123/round=1/a.parquet"
    assert store.completed() == {"a", "b"}
    np.testing.assert_array_equal(store.read_bag("a", label=1).features, emb)
    assert store.metadata()["tile_size"] == 224 and store.metadata()["dim"] == 8
    store.record_error("c", "extract", "first")
    store.record_error("d", "index", "second")
    assert [(e["slide_id"], e["cause"]) for e in store.errors()] == [("c", "first"), ("d", "second")]
    with pytest.raises(StoreError, match="slide 'zz': features not in s3://"):
        store.read_bag("zz")
    # Only complete slide files and one object per error record: no probe, no temp objects (pyarrow keeps a folder
    # marker, a key ending in /, when the probe leaves the folder empty).
    keys = [k for k in _keys(s3, "roundtrip/features/") if not k.endswith("/")]
    assert [k for k in keys if k.endswith(".parquet")] == [
        "roundtrip/features/small_cnn-abc123/round=1/a.parquet", "roundtrip/features/small_cnn-abc123/round=1/b.parquet"]
    assert len([k for k in keys if "/errors.jsonl.d/" in k]) == 2 and len(keys) == 4

    from hnm_ray.config import TilingConfig
    from hnm_ray.extraction.index import TileIndex

    index = TileIndex(f"s3://{BUCKET}/roundtrip/features", TilingConfig())
    assert not index.has("a")
    index.write("a", _tiles(4))
    assert index.has("a") and index.read("a").equals(_tiles(4))


def test_a_bucket_that_does_not_exist_stops_before_any_work(s3):
    with pytest.raises(ConfigError, match="'run.store'.*bucket of s3://nope/features does not exist"):
        storage.check("s3://nope/features", "run.store")
    with pytest.raises(ConfigError, match="'run.runs_dir'.*s4://x/runs cannot be reached.*Use s3://BUCKET/PREFIX"):
        storage.check("s4://x/runs", "run.runs_dir")
    storage.check(f"s3://{BUCKET}/anything", "run.store")  # an existing bucket passes
    storage.check("relative/folder", "run.store")  # local folders are not checked here


@pytest.mark.timeout(300)
def test_extraction_into_s3_resumes_with_exactly_the_missing_slides(s3, ray_session, demo_cohort):
    from hnm_ray.extract import extract_features
    from hnm_ray.store.manifest import load_manifest

    config = small_config()
    records = load_manifest(demo_cohort, seed=0)[:4]
    store = store_for(f"s3://{BUCKET}/extract/features", config)
    started = time.perf_counter()
    first = extract_features(records[:2], store, config)
    first_seconds = time.perf_counter() - started
    assert first.slides_written == 2 and store.completed() == {r.slide_id for r in records[:2]}
    started = time.perf_counter()
    second = extract_features(records, store, config)
    assert (second.slides_skipped_done, second.slides_written, second.slides_failed) == (2, 2, [])
    print(json.dumps({"s3_extract_2_slides_s": round(first_seconds, 1),
                      "s3_resume_2_more_slides_s": round(time.perf_counter() - started, 1)}))
    assert store.completed() == {r.slide_id for r in records}
    feature_keys = [k for k in _keys(s3, "extract/features/") if "/round=0/" in k and k.endswith(".parquet")]
    assert len(feature_keys) == len(records)  # one object per slide, none twice
    index_keys = [k for k in _keys(s3, "extract/features/index/") if k.endswith(".parquet")]
    assert len(index_keys) == len(records)
    for record in records:  # every slide complete: as many feature rows as tiles in its index
        assert store.read_table(record.slide_id).num_rows == storage.num_rows(
            f"s3://{BUCKET}/" + next(k for k in index_keys if k.endswith(f"/{record.slide_id}.parquet")))
    assert store.dataset(["slide_id", "tile_id"]).count() == sum(store.read_table(r.slide_id).num_rows for r in records)


WRITER = textwrap.dedent("""
    import sys, numpy as np, pyarrow as pa
    from hnm_ray.store.features import FeatureStore
    n, dim = 6000, 1024  # ~24 MB of incompressible float32: a multipart upload of 3 parts
    ids = np.arange(n, dtype=np.int32)
    tiles = pa.table({"tile_id": ids, "x": ids, "y": ids, "level": np.zeros(n, np.int8), "size": np.full(n, 224, np.int16)})
    emb = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    FeatureStore(sys.argv[1], "big", round=0).write_slide("big", tiles, emb)
    print("written")
""")


@pytest.mark.timeout(180)
def test_a_writer_killed_mid_upload_leaves_no_slide_and_the_rerun_completes_it(s3):
    root = f"s3://{BUCKET}/killed/features"
    store = FeatureStore(root, "big", round=0)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started, parts = time.perf_counter(), []
    try:
        while writer.poll() is None and not parts and time.perf_counter() - started < 120:
            for upload in s3.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads", []):
                parts = s3.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", [])
            time.sleep(0.005)
        assert parts, f"no upload part seen before the writer ended: {writer.communicate()}"
        writer.send_signal(signal.SIGKILL)  # mid-upload: at least one part sent, the upload not completed
    finally:
        writer.kill()
        writer.wait()
    sent = sum(p["Size"] for p in parts)
    assert store.completed() == set() and _keys(s3, "killed/") == []  # nothing visible, not even a partial object
    assert s3.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads")  # the invisible leftover
    started = time.perf_counter()
    rerun = subprocess.run([sys.executable, "-c", WRITER, root], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    print(json.dumps({"killed_after_bytes_sent": sent, "parts_sent": len(parts),
                      "rerun_write_s": round(time.perf_counter() - started, 1)}))
    assert store.completed() == {"big"} and store.read_table("big", columns=["tile_id"]).num_rows == 6000


TINY_JOB = ["--rounds", "0", "--mil.epochs", "3", "--mil.workers", "0", "--mil.checkpoint_every", "1",
            "--pretrain.method", "none", "--heatmaps", "1"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_train_job_with_runs_and_store_on_s3_finishes_and_resumes_on_a_fresh_machine(s3, ray_session, demo_cohort,
                                                                                      tmp_path, monkeypatch):
    from hnm_ray import train

    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "machine_a"))
    argv = ["--manifest", str(demo_cohort), "--runs-dir", f"s3://{BUCKET}/runs",
            "--store", f"s3://{BUCKET}/job/features", "--run.name", "job", *TINY_JOB]
    started = time.perf_counter()
    assert train.main(argv) == 0
    job_seconds = time.perf_counter() - started
    keys = _keys(s3, "runs/job/")
    for name in ("state.json", "config.yaml", "metrics.json", "report.html", "checkpoint/aggregator.safetensors",
                 "metrics_round0.json"):
        assert f"runs/job/{name}" in keys, keys
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith(".") and "/ray_train/" not in k]  # no bookkeeping
    assert [k for k in _keys(s3, "job/features/") if k.endswith(".parquet") and "/round=0/" in k]
    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/job/metrics.json")["Body"].read())
    state = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/job/state.json")["Body"].read())
    assert "mil_round0" in state

    # Machine A is lost after extraction: the remote state.json says only that; another machine (empty cache)
    # resumes from the URI, fetches the run folder, trains the aggregator again and ends with the same metrics.
    del state["mil_round0"]
    s3.put_object(Bucket=BUCKET, Key="runs/job/state.json", Body=json.dumps(state).encode())
    s3.delete_object(Bucket=BUCKET, Key="runs/job/metrics.json")
    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "machine_b"))
    started = time.perf_counter()
    assert train.main(["--resume", f"s3://{BUCKET}/runs/job"]) == 0
    resume_seconds = time.perf_counter() - started
    resumed = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/job/metrics.json")["Body"].read())
    drop = ("model_path", "encoder_weights")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed["rounds"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics["rounds"]]
    assert "mil_round0" in json.loads(s3.get_object(Bucket=BUCKET, Key="runs/job/state.json")["Body"].read())
    staged = list((tmp_path / "machine_b" / "staged_runs").glob("*/job"))
    assert len(staged) == 1 and (staged[0] / "config.yaml").is_file()
    print(json.dumps({"s3_job_s": round(job_seconds, 1), "s3_resume_mil_on_fresh_machine_s": round(resume_seconds, 1),
                      "run_objects": len(keys)}))
    print("\n".join(keys))


def test_a_sync_cut_short_keeps_the_previous_state_json(s3, tmp_path, monkeypatch):
    from hnm_ray.run import run_folder

    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/cut/run"
    local = run_folder.staged(uri)
    state = run_folder.RunState(local)
    (local / "stage0.txt").write_text("output of stage 0")
    state.done("stage0", 1)  # syncs: stage0.txt, then state.json
    (local / "stage1.txt").write_text("output of stage 1")
    real_write = storage.write_bytes

    def cut_after_first_upload(data, item):  # the sync dies after one file: the connection or the machine is lost
        if storage.is_uri(item):  # local writes (state.json itself) go through write_bytes too
            monkeypatch.setattr(storage, "write_bytes", lambda *a: (_ for _ in ()).throw(OSError("connection lost")))
        return real_write(data, item)

    monkeypatch.setattr(storage, "write_bytes", cut_after_first_upload)
    with pytest.raises(StoreError, match="remote copy keeps its last complete state"):
        state.done("stage1", 2)
    remote_state = json.loads(s3.get_object(Bucket=BUCKET, Key="cut/run/state.json")["Body"].read())
    assert remote_state == {"stage0": 1}  # stage1's output went up, its state.json did not: stage1 reruns
    assert _keys(s3, "cut/run/") == ["cut/run/stage0.txt", "cut/run/stage1.txt", "cut/run/state.json"]


def test_tune_storage_path_stays_a_uri(s3, ray_session, tmp_path, monkeypatch):
    from hnm_ray import config as cfg
    from hnm_ray.tune import TuneConfig, run_sweep

    monkeypatch.setenv("HNM_RAY_CACHE", str(tmp_path / "cache"))
    config = cfg.from_tree(TuneConfig, {"sweep": {"storage_path": f"s3://{BUCKET}/tune", "sweep_name": "s"}})
    with pytest.raises(ConfigError, match=f"no sweep to restore at s3://{BUCKET}/tune/s;"):
        run_sweep(config, resume=True)  # Tune looked in the bucket, not in a local folder named 's3:'
    config.sweep.storage_path = "s3://nope/tune"
    with pytest.raises(ConfigError, match="'sweep.storage_path'.*does not exist"):
        run_sweep(config, resume=True)


def test_download_tree_refuses_object_keys_that_would_land_outside_the_folder(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="shared/run/state.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="shared/run/../../escaped.txt", Body=b"written outside")
    with pytest.raises(StoreError, match=r"would be written outside .*'\.\./\.\./escaped\.txt'"):
        storage.download_tree(f"s3://{BUCKET}/shared/run", tmp_path / "stage" / "run", overwrite=True)
    assert not list(tmp_path.rglob("escaped.txt"))
