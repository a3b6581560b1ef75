"""Blob storage behind one interface (issue 16): the same contract for the local directory (the default) and
for an S3-compatible object store, the latter against a real S3 HTTP server started locally (moto_server, from
the `dev` extra's moto[server]); and a whole server on the S3 store: publish, push (adapter and trajectory),
aggregate, download, with no blob on local disk but the read cache."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time

import httpx
import pytest

from patch_factory import make_patch
from server_conftest import ADMIN, LiveServer, free_port, make_settings
from zoedge.device.client import FleetClient
from zoedge.device.outbox import Outbox
from zoedge.errors import ZoedgeError
from zoedge.server.blobs import LocalStore
from zoedge.transfer import SHA256_HEADER

BUCKET = "zoedge-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible HTTP server on loopback (moto_server), with an empty bucket."""
    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) provides the local S3 server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {proc.stderr.read()[-2000:]!r}")
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def s3_settings(tmp_path, endpoint: str, prefix: str, **kw):
    return make_settings(tmp_path, "sqlite", blob_store="s3", s3_bucket=BUCKET, s3_prefix=prefix,
                         s3_endpoint_url=endpoint, **kw)


def bucket_keys(endpoint: str, prefix: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "blobs")
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    from zoedge.server.blobs import make_store

    endpoint = request.getfixturevalue("s3_endpoint")
    return make_store(s3_settings(tmp_path / "data", endpoint, f"contract-{tmp_path.name}/"))


def test_the_store_contract(store, tmp_path):
    data = b"zoedge blob " * 1000
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha)
    with store.temp_file() as t:  # a wrong sha256 stores nothing
        t.write_bytes(data)
        with pytest.raises(ZoedgeError, match="does not match"):
            store.put_file(t, "0" * 64)
    assert not store.exists("0" * 64)
    with pytest.raises(ValueError):
        store.exists("../etc/passwd")
    with store.temp_file() as t:
        t.write_bytes(data)
        store.put_file(t, sha)
        assert not t.exists()  # consumed
    assert store.exists(sha) and store.size(sha) == len(data)
    with store.open(sha) as f:
        assert f.read() == data
    assert b"".join(store.stream(sha, chunk=4096)) == data
    assert store.path(sha).read_bytes() == data  # a local file with the content (S3: the checked cache copy)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert store.put_copy(src) == sha and src.read_bytes() == data  # idempotent; the source is kept
    with store.temp_dir() as d:
        (d / "x").write_bytes(b"other")
        other = store.put_copy(d / "x")
    assert store.exists(other) and not d.exists()
    store.delete(sha)
    assert not store.exists(sha) and store.exists(other)
    store.delete(sha)  # deleting what is not there is fine


def test_a_server_on_the_s3_store(s3_endpoint, tiny_bert_bundle, tmp_path, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    prefix = "server/"
    live = LiveServer(s3_settings(tmp_path / "data", s3_endpoint, prefix, norm_ratio_min_patches=1)).start()
    try:
        with FleetClient(live.url, ADMIN) as admin:
            bundle = admin.publish_bundle(tiny_bert_bundle)
            token = admin.register_device("pi")["token"]
        a = make_patch(tiny_bert_bundle, tmp_path / "a", run_seed=1, seed=1)
        b = make_patch(tiny_bert_bundle, tmp_path / "b", steps=5, run_seed=2, seed=2, start_head=True)
        with FleetClient(live.url, token, retries=1, backoff=0.05) as c:
            pa = c.push(a, "adapter", Outbox(tmp_path / "o"))
            pb = c.push(b, "trajectory", Outbox(tmp_path / "o"))  # replayed against the bundle from S3
            c.pull(pb["patch_id"], tmp_path / "pulled")
        assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == \
            (b / "adapter_model.safetensors").read_bytes()
        with FleetClient(live.url, ADMIN) as admin:
            g = admin.aggregate(bundle["bundle_id"], [pa["patch_id"], pb["patch_id"]])
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            for path in (f"/v1/patches/{pa['patch_id']}/archive", f"/v1/patches/{g['patch_id']}/adapter",
                         f"/v1/bundles/{bundle['bundle_id']}/archive"):
                r = http.get(path)
                assert r.status_code == 200, (path, r.text[:300])
                assert hashlib.sha256(r.content).hexdigest() == r.headers[SHA256_HEADER]
                assert int(r.headers["content-length"]) == len(r.content)
        keys = bucket_keys(s3_endpoint, prefix)
        with live.state.sessions() as db:
            from sqlalchemy import select

            from zoedge.server.models import Bundle, Patch

            shas = {bundle_row.sha256 for bundle_row in db.scalars(select(Bundle))}
            for p in db.scalars(select(Patch)):
                shas |= {p.sha256, p.archive_sha256, p.adapter_blob}
        assert {f"{prefix}{s[:2]}/{s}" for s in shas} == keys, "every stored blob is in the bucket, nothing else"
        assert not (tmp_path / "data" / "blobs").exists()  # nothing stored on local disk but the read cache
    finally:
        live.stop()
