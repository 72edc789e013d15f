"""A real S3 server on 127.0.0.1 for the object-storage tests: moto's server mode (what s3fs's own tests
use), started and stopped here, one bucket per test. Credentials are moto's dummies."""

from __future__ import annotations

import itertools

import pytest

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The local server's URL, for the whole session."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """(filesystem, "s3://BUCKET"): a fresh bucket, and fsspec pointed at the server, in this process
    (fsspec's config) and in any process it starts (the environment)."""
    import fsspec.config
    import s3fs

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    bucket = f"test-{next(_buckets)}"
    fs.mkdir(bucket)
    yield fs, f"s3://{bucket}"
    fs.rm(bucket, recursive=True)
