"""Objects and Delta tables on a real S3 API (the moto server subprocess): pagination, prefixes, odd keys, one config
for every client, and objects S3 will not hand over (archived, denied), which are rejected one by one."""

from __future__ import annotations

import io
import json
import multiprocessing
import threading
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from deltalake import DeltaTable
from PIL import Image

from imgemb_assets.core.ingest.discovery import DiscoveryCursor, partition_fingerprint, plan_discovery
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.notifications import sqs_client
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.thumbnails import downscale_partition
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import REJECTED_IMAGES_SCHEMA
from imgemb_assets.core.storage.errors import ObjectMissing, ObjectRefused, StorageError
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3ConfigError, S3Settings, split_s3_uri
from imgemb_assets.core.storage.s3_store import S3ObjectStore
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource
from imgemb_support.fault_proxy import running_fault_proxy
from imgemb_support.moto_server import MOTO_CREDENTIALS

# Keys as they occur in real buckets.
ODD_PREFIXES = ["2026-11-01", "summer sale", "café ☕", "a+b=c", "100%", "it's", "x' OR '1'='1"]
ODD_NAMES = ["img 1.jpg", "été.png", "a+b=c.jpg", "50%.jpg", "o'neil.jpg"]


def _put(client: object, bucket: str, key: str, body: bytes = b"x") -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_prefix_with_more_than_1000_objects_is_listed_completely(bucket: str) -> None:
    client = S3Settings().client()
    keys = [f"raw-images/big/img_{number:05d}.jpg" for number in range(1_234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: _put(client, bucket, key), keys))
    store = open_object_store(f"s3://{bucket}/raw-images")
    listed = list(store.list_objects("big"))
    assert [obj.key for obj in listed] == [key.removeprefix("raw-images/") for key in keys]
    assert all(
        obj.size_bytes == 1 and obj.etag and obj.uri.startswith(f"s3://{bucket}/raw-images/big/") for obj in listed
    )


def test_prefixes_root_objects_and_folder_markers(bucket: str) -> None:
    client = S3Settings().client()
    for key in ["raw-images/p1/a.jpg", "raw-images/p2/deep/b.jpg", "raw-images/stray.jpg", "raw-images/p1/"]:
        _put(client, bucket, key, b"" if key.endswith("/") else b"data")
    _put(client, bucket, "elsewhere/p3/c.jpg")
    store = open_object_store(f"s3://{bucket}/raw-images/")
    assert store.list_prefixes() == ["p1", "p2"]
    assert store.list_root_files() == ["stray.jpg"]
    assert [obj.key for obj in store.list_objects("p1")] == ["p1/a.jpg"]  # the "p1/" marker is no object
    assert [obj.key for obj in store.list_objects("p2")] == ["p2/deep/b.jpg"]


def test_odd_keys_round_trip(bucket: str) -> None:
    client = S3Settings().client()
    expected = {}
    for prefix in ODD_PREFIXES:
        for name in ODD_NAMES:
            body = f"{prefix}/{name}".encode()
            _put(client, bucket, f"raw-images/{prefix}/{name}", body)
            expected[f"{prefix}/{name}"] = body
    store = open_object_store(f"s3://{bucket}/raw-images")
    assert store.list_prefixes() == sorted(ODD_PREFIXES)
    for prefix in ODD_PREFIXES:
        objects = list(store.list_objects(prefix))
        assert sorted(obj.key for obj in objects) == sorted(f"{prefix}/{name}" for name in ODD_NAMES)
        for obj in objects:
            assert store.read_bytes(obj.uri) == expected[obj.key]


def test_reading_outside_the_root_is_refused(bucket: str) -> None:
    _put(S3Settings().client(), bucket, "secrets/key.txt")
    store = open_object_store(f"s3://{bucket}/raw-images")
    with pytest.raises(StorageError, match="outside the root"):
        store.read_bytes(f"s3://{bucket}/secrets/key.txt")
    with pytest.raises(StorageError, match="outside the root"):
        store.read_bytes(f"s3://{bucket}/raw-images-other/x.jpg")


def _rows(prefix: str, ids: list[str]) -> pa.Table:
    return pa.table(
        {"image_id": ids, "prefix": [prefix] * len(ids), "uri": ids, "reason": ["r"] * len(ids)}
        | {"etag": [None] * len(ids), "decoded_with": [None] * len(ids)},
        schema=REJECTED_IMAGES_SCHEMA,
    )


def test_delta_partitions_with_odd_keys_on_s3(bucket: str) -> None:
    lake = Lake(f"s3://{bucket}/delta", storage_options=S3Settings().delta_storage_options())
    for number, prefix in enumerate(ODD_PREFIXES):
        lake.write_partition("t", _rows(prefix, [f"{number}a", f"{number}b"]), prefix)
    lake.write_partition("t", _rows("it's", ["replaced"]), "it's")
    for number, prefix in enumerate(ODD_PREFIXES):
        ids = sorted(lake.read("t", prefix).column("image_id").to_pylist())
        assert ids == (["replaced"] if prefix == "it's" else [f"{number}a", f"{number}b"])
    assert lake.read("t").num_rows == 2 * len(ODD_PREFIXES) - 1


def _write_partition_in_child(storage_options: dict[str, str], uri: str, prefix: str, count: int) -> None:
    Lake(uri, storage_options=storage_options).write_partition(
        "t", _rows(prefix, [f"{prefix}-{i}" for i in range(count)]), prefix
    )


def test_concurrent_writers_of_different_partitions_both_land(bucket: str) -> None:
    options = S3Settings().delta_storage_options()
    root = f"s3://{bucket}/delta"
    Lake(root, storage_options=options).write_partition("t", _rows("seed", ["0"]), "seed")
    # deltalake must not run in a forked child: spawn, as Dagster's multiprocess executor does.
    context = multiprocessing.get_context("spawn")
    for _round in range(3):
        children = [
            context.Process(target=_write_partition_in_child, args=(options, root, prefix, 50))
            for prefix in ("left", "right")
        ]
        for child in children:
            child.start()
        for child in children:
            child.join(timeout=120)
            assert child.exitcode == 0
    table = Lake(root, storage_options=options).read("t")
    counts = {prefix: table.column("prefix").to_pylist().count(prefix) for prefix in ("seed", "left", "right")}
    assert counts == {"seed": 1, "left": 50, "right": 50}  # no lost commit, no duplicate rows
    assert DeltaTable(f"{root}/t", storage_options=options).version() == 6


def test_one_config_feeds_boto3_and_delta(s3_env: dict[str, str]) -> None:
    settings = S3Settings()
    options = settings.delta_storage_options()
    assert options["AWS_ENDPOINT_URL"] == s3_env["AWS_ENDPOINT_URL"]
    assert options["AWS_ALLOW_HTTP"] == "true"
    assert options["AWS_REGION"] == "us-east-1"
    assert options["AWS_ACCESS_KEY_ID"] == MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"]
    client = settings.client()
    assert client.meta.endpoint_url == s3_env["AWS_ENDPOINT_URL"]
    assert client.meta.config.retries == {"total_max_attempts": 5, "mode": "standard"}
    explicit = S3Settings(
        endpoint_url="http://other:9000", region_name="eu-west-1", retry_mode="adaptive", max_attempts=9
    )
    assert explicit.delta_storage_options()["AWS_ENDPOINT_URL"] == "http://other:9000"
    assert explicit.delta_storage_options()["AWS_REGION"] == "eu-west-1"
    assert explicit.client().meta.config.retries == {"total_max_attempts": 9, "mode": "adaptive"}


def test_the_s3_and_sqs_clients_take_the_same_retries_pool_and_timeouts() -> None:
    settings = S3Settings(
        max_attempts=3, retry_mode="adaptive", max_pool_connections=7, connect_timeout_s=2.5, read_timeout_s=9.0
    )
    queue = sqs_client(settings, "http://127.0.0.1:9/123456789012/events")
    for client in (settings.client(), queue):
        config = client.meta.config
        assert config.retries == {"total_max_attempts": 3, "mode": "adaptive"}
        assert (config.max_pool_connections, config.connect_timeout, config.read_timeout) == (7, 2.5, 9.0)
    assert settings.botocore_config(ignore_configured_endpoint_urls=True).ignore_configured_endpoint_urls is True


def test_settings_are_read_from_a_config_that_mirrors_every_field() -> None:
    settings = S3Settings(
        endpoint_url="http://minio:9000", region_name="eu-west-3", profile_name="ci", aws_access_key_id="key",
        aws_secret_access_key="secret", aws_session_token="token", allow_http=False, max_attempts=2,
        retry_mode="adaptive", max_pool_connections=4, connect_timeout_s=1.5, read_timeout_s=7.0,
    )  # fmt: skip
    assert S3Settings.from_attributes(SimpleNamespace(**asdict(settings))) == settings
    # the Dagster resource that mirrors them, every field set
    assert ImgembS3Resource(**asdict(settings)).settings() == settings
    with pytest.raises(AttributeError, match="region_name"):
        S3Settings.from_attributes(SimpleNamespace(endpoint_url=None))  # a field it lacks is an error, not a default


def test_allow_http_follows_the_variable_or_the_endpoint_scheme() -> None:
    assert S3Settings(endpoint_url="http://minio:9000").delta_storage_options({})["AWS_ALLOW_HTTP"] == "true"
    assert "AWS_ALLOW_HTTP" not in S3Settings(endpoint_url="https://minio:9000").delta_storage_options({})
    assert "AWS_ALLOW_HTTP" not in S3Settings(endpoint_url="http://m:9000").delta_storage_options(
        {"AWS_ALLOW_HTTP": "false"}
    )


def test_credentials_stay_out_of_reprs_and_errors(bucket: str) -> None:
    secret = MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    settings = S3Settings(aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key=secret)
    lake = Lake(f"s3://{bucket}/delta", storage_options=settings.delta_storage_options())
    assert secret not in repr(settings) and secret not in repr(lake)
    store = open_object_store(f"s3://{bucket}/raw", settings)
    assert secret not in repr(store)
    # errors S3 itself answered (the bucket does not exist), through delta-rs and through boto3,
    # with every exception they chain: none of them holds the secret
    absent = "no-such-bucket-imgemb"
    missing = Lake(f"s3://{absent}/delta", storage_options=settings.delta_storage_options())
    with pytest.raises(OSError) as delta_error:  # what is written does not matter: the table is looked up first
        missing.write_partition("t", pa.table({"image_id": ["1"], "prefix": ["p"]}), "p")
    assert "NoSuchBucket" in str(delta_error.value) and absent in str(delta_error.value)
    with pytest.raises(ClientError) as boto_error:
        list(open_object_store(f"s3://{absent}/raw", settings).list_objects("p"))
    assert boto_error.value.response["Error"]["Code"] == "NoSuchBucket"
    for error in (delta_error.value, boto_error.value):
        assert secret not in "".join(traceback.format_exception(error))


def test_invalid_settings_and_uris_are_clear_errors() -> None:
    with pytest.raises(S3ConfigError, match="retry mode"):
        S3Settings(retry_mode="legacy")
    with pytest.raises(S3ConfigError, match="names no bucket"):
        split_s3_uri("s3:///raw")
    assert split_s3_uri("s3://b/a/b/") == ("b", "a/b")
    assert isinstance(open_object_store("s3://b"), S3ObjectStore)


def test_object_bodies_cut_short_are_read_again(bucket: str, moto_endpoint: str) -> None:
    """botocore retries a request until its headers arrive; a body cut off after them is re-read here."""
    contents = {f"p/{i}.bin": bytes([i]) * (2_000 + i) for i in range(20)}
    client = S3Settings().client()
    for key, body in contents.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    with running_fault_proxy(moto_endpoint, share=0.5, seed=3, kinds=("truncate",)) as proxy:
        store = open_object_store(f"s3://{bucket}", S3Settings(endpoint_url=proxy.url, max_attempts=8))
        read = {key: store.read_bytes(f"s3://{bucket}/{key}") for key in contents}
        stats = proxy.stats()
    assert read == contents
    assert stats["truncate"] >= 5, stats


def test_an_object_deleted_after_listing_is_reported_as_missing(bucket: str) -> None:
    client = S3Settings().client()
    client.put_object(Bucket=bucket, Key="p/gone.jpg", Body=b"x")
    store = open_object_store(f"s3://{bucket}")
    (listed,) = store.list_objects("p")
    client.delete_object(Bucket=bucket, Key="p/gone.jpg")
    with pytest.raises(ObjectMissing, match="no longer exists"):
        store.read_bytes(listed.uri)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_archived_and_denied_objects_are_rejected_with_their_reason_and_the_others_kept(bucket: str) -> None:
    client = S3Settings().client()
    client.put_object(Bucket=bucket, Key="raw/p/ok.jpg", Body=_jpeg())
    client.put_object(Bucket=bucket, Key="raw/p/cold.jpg", Body=_jpeg(), StorageClass="GLACIER")
    client.put_object(Bucket=bucket, Key="raw/p/denied.jpg", Body=_jpeg())
    deny = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/raw/p/denied.jpg",
    }
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    store = open_object_store(f"s3://{bucket}/raw")
    result = downscale_partition(store, build_manifest(store.list_objects("p"), "p"))
    assert result.images.column("image_id").to_pylist() == ["ok"]
    reasons = {row["image_id"]: row["reason"] for row in result.rejected.to_pylist()}
    assert reasons == {
        "cold": "archived (S3 Glacier / Deep Archive / archive tier): restore it, then materialize the partition again "
        "(S3 InvalidObjectState)",
        # moto answers a policy's denial with a bare 403
        "denied": "access denied: grant read access to it, then materialize the partition again (HTTP 403)",
    }


@contextmanager
def _s3_answering(code: str) -> Iterator[str]:
    """An HTTP endpoint that answers every GET with S3's error document for `code` (HTTP 403), as AWS does."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>refused</Message>'
        "<RequestId>R</RequestId><HostId>H</HostId></Error>"
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_access_denied_is_a_rejection_but_a_bad_identity_stays_a_failure(s3_env: dict[str, str]) -> None:
    with _s3_answering("AccessDenied") as endpoint:
        store = open_object_store("s3://bucket/raw", S3Settings(endpoint_url=endpoint, max_attempts=1))
        with pytest.raises(ObjectRefused, match=r"access denied: .* \(S3 AccessDenied\)"):
            store.read_bytes("s3://bucket/raw/p/x.jpg")
    # a wrong key or a skewed clock fails every object alike: the step fails, nothing is rejected
    with _s3_answering("InvalidAccessKeyId") as endpoint:
        store = open_object_store("s3://bucket/raw", S3Settings(endpoint_url=endpoint, max_attempts=1))
        with pytest.raises(ClientError, match="InvalidAccessKeyId"):
            store.read_bytes("s3://bucket/raw/p/x.jpg")


def test_objects_under_an_empty_first_segment_are_no_partition(bucket: str) -> None:
    client = S3Settings().client()
    for key in ["raw/p/a.jpg", "raw//x.jpg", "raw//deep/y.jpg", "raw/stray.jpg"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    store = open_object_store(f"s3://{bucket}/raw")
    stray = PartitionScheme().partition_of("stray.jpg")  # a loose object: in a hash bucket of the default scheme
    plan = plan_discovery(store, DiscoveryCursor(), recent=3, full=True)
    assert plan.new_prefixes == sorted(["p", stray]) and sorted(plan.changed) == plan.new_prefixes
    assert list(plan.refused_prefixes) == [""] and "empty first path segment" in plan.refused_prefixes[""]
    left_out = plan_discovery(
        PartitionedRoot(store, PartitionScheme.parse("folders,loose:0")), DiscoveryCursor(), recent=3
    )
    assert left_out.new_prefixes == ["p"] and left_out.root_objects == ["stray.jpg"]


def test_a_key_is_read_exactly_as_listed(bucket: str) -> None:
    # '/x.jpg' and 'x.jpg' are two objects; the URI of the first must not be read as the second.
    client = S3Settings().client()
    client.put_object(Bucket=bucket, Key="x.jpg", Body=b"plain")
    client.put_object(Bucket=bucket, Key="/x.jpg", Body=b"leading slash")
    store = open_object_store(f"s3://{bucket}")
    read = {obj.key: store.read_bytes(obj.uri) for obj in store.list_objects("")}
    assert read == {"/x.jpg": b"leading slash", "x.jpg": b"plain"}


def test_a_key_with_a_dot_segment_is_refused_without_a_request() -> None:
    # urllib3 collapses '/./' and '/../' in the request path: 'raw/../secret' would read 'secret'.
    store = S3ObjectStore(client=None, bucket="b", root_key="raw")
    for uri in ("s3://b/raw/p/../secret.jpg", "s3://b/raw/p/./a.jpg", "s3://b/raw/../x.jpg"):
        assert "'.' or '..' path segment" in (store.refusal(uri) or "")
        with pytest.raises(ObjectRefused, match="path segment"):
            store.read_bytes(uri)
    assert store.refusal("s3://b/raw/p/a..b/.hidden.jpg") is None


def test_delta_partitions_of_long_non_ascii_prefixes_on_s3(bucket: str) -> None:
    lake = Lake(f"s3://{bucket}/delta", storage_options=S3Settings().delta_storage_options())
    prefixes = ["ж" * 51, "é" * 400, " lead", "2026-11-01"]
    for number, prefix in enumerate(prefixes):
        lake.write_partition("t", _rows(prefix, [str(number)]), prefix)
    assert lake.partition_keys("t") == sorted(prefixes)
    assert {prefix: lake.read("t", prefix).column("image_id").to_pylist() for prefix in prefixes} == {
        prefix: [str(number)] for number, prefix in enumerate(prefixes)
    }


def test_a_root_too_big_for_one_tick_is_listed_over_several_and_fingerprinted_once_whole(bucket: str) -> None:
    client = S3Settings().client()
    loose = [f"raw/img_{number:03d}.jpg" for number in range(230)]
    for key in [*loose, "raw/2026-11-01/a.jpg", "raw/2026-11-02/b.jpg"]:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    lists: list[str] = []
    client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: lists.append(params.get("Prefix", ""))
    )
    store = S3ObjectStore(client=client, bucket=bucket, root_key="raw", page_keys=50)
    root = PartitionedRoot(store, PartitionScheme())
    cursor, ticks, registered = DiscoveryCursor(), 0, []
    while True:
        lists.clear()
        plan = plan_discovery(root, cursor, recent=0, max_root_pages=1)
        ticks += 1
        assert lists.count("raw/") == 1, "one page of the root per tick"
        registered += plan.new_prefixes
        cursor = plan.cursor
        if plan.loose_pass is None:
            break
        assert not any(key.startswith("(loose)") for key in plan.changed), "a loose bucket is judged on the whole root"
    assert ticks == 5  # 232 entries (230 objects, 2 folders) in pages of 50
    expected = sorted({PartitionScheme().partition_of(key.removeprefix("raw/")) for key in loose})
    assert sorted(key for key in registered if key.startswith("(loose)")) == expected
    assert {"2026-11-01", "2026-11-02"} <= set(registered)
    # the summed fingerprints of a pass equal those of the whole listing (what a manifest records)
    whole = PartitionedRoot(store, PartitionScheme())
    for key in expected:
        assert cursor.fingerprints[key] == partition_fingerprint(whole.scheme, key, whole.list_partition(key))
    # one object added: the next pass reports its bucket alone
    client.put_object(Bucket=bucket, Key="raw/img_new.jpg", Body=b"new")
    changed: dict[str, str] = {}
    while True:
        plan = plan_discovery(root, cursor, recent=0, max_root_pages=1)
        changed |= plan.changed
        cursor = plan.cursor
        if plan.loose_pass is None:
            break
    assert list(changed) == [PartitionScheme().partition_of("img_new.jpg")]
