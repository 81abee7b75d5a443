"""delta-rs sees refreshed credentials: each Delta operation takes the boto3 session's current ones.

A moto S3 server of its own, with IAM authentication enforced, stands for AWS: it
refuses a deleted access key, as AWS refuses an expired session. The credentials come
from a `credential_process` (how SSO helpers and role tools hand out temporary
credentials): short-lived, so boto3 refreshes them, and rotated by the test mid-step.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pyarrow as pa
import pytest

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import PARTITION_COLUMN
from imgemb_assets.core.storage.s3 import S3AccessDenied, S3Settings
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_support.moto_server import running_moto_server

_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
_SETUP_KEYS = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup-secret"}


@pytest.fixture(scope="module")
def enforcing_moto() -> Iterator[dict[str, object]]:
    """A moto server where only the keys of IAM user `writer` are accepted, with two of its keys and a bucket."""
    with running_moto_server() as endpoint:
        setup = boto3.session.Session(region_name="us-east-1", **_SETUP_KEYS)
        iam = setup.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="writer")
        iam.put_user_policy(UserName="writer", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        keys = [iam.create_access_key(UserName="writer")["AccessKey"] for _ in range(2)]
        bucket = f"imgemb-{uuid.uuid4().hex[:12]}"
        setup.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        # From here on every request must be signed by a live key of `writer`.
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=10).close()
        yield {"endpoint": endpoint, "keys": keys, "bucket": bucket}


class RotatingCredentials:
    """A `credential_process` profile whose process answers whatever key the test last issued."""

    def __init__(self, folder: Path) -> None:
        self._current = folder / "current.json"
        self.config = folder / "aws-config"
        command = f'{sys.executable} -c "import sys; sys.stdout.write(open(sys.argv[1]).read())" {self._current}'
        self.config.write_text(f"[profile rotating]\ncredential_process = {command}\n")

    def issue(self, key: dict[str, str], lifetime: dt.timedelta = dt.timedelta(minutes=5)) -> None:
        expiration = dt.datetime.now(dt.UTC) + lifetime
        self._current.write_text(
            json.dumps(
                {
                    "Version": 1,
                    "AccessKeyId": key["AccessKeyId"],
                    "SecretAccessKey": key["SecretAccessKey"],
                    "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
        )


@pytest.fixture
def rotating(enforcing_moto: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RotatingCredentials:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    credentials = RotatingCredentials(tmp_path)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(credentials.config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials-file"))
    monkeypatch.setenv("AWS_PROFILE", "rotating")
    monkeypatch.setenv("AWS_ENDPOINT_URL", str(enforcing_moto["endpoint"]))
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    return credentials


def _rows(prefix: str) -> pa.Table:
    return pa.table({"image_id": [f"{prefix}-a", f"{prefix}-b"], PARTITION_COLUMN: [prefix, prefix]})


def _retire(enforcing_moto: dict[str, object], old: dict[str, str], new: dict[str, str]) -> None:
    """The old key stops working, as an expired session does."""
    session = boto3.session.Session(
        region_name="us-east-1", aws_access_key_id=new["AccessKeyId"], aws_secret_access_key=new["SecretAccessKey"]
    )
    iam = session.client("iam", endpoint_url=str(enforcing_moto["endpoint"]))
    iam.delete_access_key(UserName="writer", AccessKeyId=old["AccessKeyId"])


def test_a_write_after_the_credentials_rotated_uses_the_new_ones(
    enforcing_moto: dict[str, object], rotating: RotatingCredentials
) -> None:
    first, second = enforcing_moto["keys"]  # type: ignore[misc]
    rotating.issue(first)
    lake_uri = f"s3://{enforcing_moto['bucket']}/delta"
    storage = StorageResource(raw_images_uri="unused", sales_uri="unused", lake_uri=lake_uri, s3=ImgembS3Resource())
    lake = storage.lake()  # built once, as by the embedding step
    lake.write_partition("t", _rows("p1"), "p1")

    # Mid-step, the credentials rotate: the process now answers the second key, the first one is dead.
    rotating.issue(second)
    _retire(enforcing_moto, first, second)
    stale = {
        **S3Settings().delta_storage_options(),
        "AWS_ACCESS_KEY_ID": first["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": first["SecretAccessKey"],
    }
    # the server does refuse the old key, and the lake says so in one line
    with pytest.raises(S3AccessDenied, match="InvalidAccessKeyId"):
        Lake(lake.root_uri, storage_options=stale).read("t")

    lake.write_partition("t", _rows("p2"), "p2")  # the final commit of a long step

    assert sorted(lake.read("t").column("image_id").to_pylist()) == ["p1-a", "p1-b", "p2-a", "p2-b"]


def test_static_keys_are_passed_through_and_never_shown(enforcing_moto: dict[str, object]) -> None:
    key = enforcing_moto["keys"][1]  # type: ignore[index]
    settings = S3Settings(
        endpoint_url=str(enforcing_moto["endpoint"]),
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    provider = settings.delta_storage_options_provider()
    assert provider()["AWS_ACCESS_KEY_ID"] == key["AccessKeyId"]
    assert provider() == settings.delta_storage_options()
    assert key["SecretAccessKey"] not in repr(provider) and key["AccessKeyId"] not in repr(provider)
