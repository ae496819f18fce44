"""Data contracts on disk: slide manifests and the per-slide Parquet feature store."""
from hnm_ray.store.features import Bag, FeatureStore, bags, feature_schema
from hnm_ray.store.manifest import SlideRecord, load_manifest, records_from_folder, stratified_split

__all__ = ["Bag", "FeatureStore", "SlideRecord", "bags", "feature_schema", "load_manifest", "records_from_folder",
           "stratified_split"]
