"""Fingerprints, per-shard manifests, the shard plan, staleness and atomic commits."""

from manifests.atomic import (
    atomic_write,
    clean_temp_files,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from manifests.digest import digest_bytes, digest_file_content, digest_input_file, digest_json
from manifests.manifest import (
    Dep,
    Out,
    ShardSpec,
    absent_reason,
    check_outputs,
    check_shard,
    commit_manifest,
    list_manifests,
    manifest_path,
    read_manifest,
    stat_out,
    verifying_outputs,
)
from manifests.plan import ShardPlan, group_units

__all__ = [
    "Dep",
    "Out",
    "absent_reason",
    "ShardPlan",
    "ShardSpec",
    "atomic_write",
    "check_outputs",
    "check_shard",
    "clean_temp_files",
    "commit_manifest",
    "digest_bytes",
    "digest_file_content",
    "digest_input_file",
    "digest_json",
    "group_units",
    "list_manifests",
    "manifest_path",
    "read_manifest",
    "stat_out",
    "verifying_outputs",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
]
