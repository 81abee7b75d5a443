"""S3 denying the lake (HTTP 403), and a lake root that names no bucket, end in one line naming the bucket
and never a secret: a Dagster step fails with a `Failure` whose message is that line (not retried), and
`imgemb` prints it as its one `error:` line with exit status 2, instead of a delta-rs traceback.

A private moto S3 server checks credentials and IAM permissions (`set_iam_auth`), as AWS does: it answers
InvalidAccessKeyId to keys it does not know (wrong keys) and AccessDenied to a known identity without
permission (what a bucket or IAM policy does). Raw images and sales stay local: only the lake is refused.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from dagster import DagsterEventType, ExecuteInProcessResult, instance_for_test

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.arrow_filesystem import arrow_location
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import (
    PREFIX_JOB_NAME,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_JOB_NAME,
    SEARCH_INDEX_JOB_NAME,
)
from imgemb_assets.definitions import build_definitions, default_resources
from imgemb_support.location import user_shell_env
from imgemb_support.moto_server import (
    MOTO_CREDENTIALS,
    client_environment,
    running_moto_server,
    set_iam_auth,
)

BUCKET = "imgemb-refused"
WRONG_KEYS = ("AKIAIMGEMBWRONGKEY00", "imgemb-wrong-secret-0123456789abcdef")
# The step each job fails at: the first to open the lake.
FIRST_STEP = {
    SALES_JOB_NAME: tables.SALES,
    PREFIX_JOB_NAME: tables.RAW_IMAGE_MANIFEST,
    SEARCH_INDEX_JOB_NAME: "update_search_index",
}


@dataclass(frozen=True)
class RefusingS3:
    endpoint: str
    keys: dict[str, tuple[str, str]]  # S3's error code -> the (key id, secret) it answers with


@pytest.fixture(scope="module")
def refusing_s3() -> Iterator[RefusingS3]:
    with running_moto_server() as endpoint:
        session = boto3.session.Session(
            aws_access_key_id=MOTO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=MOTO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="no-permissions")
        key = iam.create_access_key(UserName="no-permissions")["AccessKey"]
        set_iam_auth(endpoint, enabled=True)
        yield RefusingS3(
            endpoint,
            {"InvalidAccessKeyId": WRONG_KEYS, "AccessDenied": (key["AccessKeyId"], key["SecretAccessKey"])},
        )


def _run(job: str, dataset: SampleDataset, lake_uri: str, s3: ImgembS3Resource) -> ExecuteInProcessResult:
    storage = StorageResource(
        raw_images_uri=dataset.raw_images_uri, sales_uri=dataset.sales_uri, lake_uri=lake_uri, s3=s3
    )
    resources = default_resources() | {"storage": storage, "embedding_model": EmbeddingModelResource(weights="random")}
    defs = build_definitions(LocationSettings(), resources)
    prefix = dataset.prefixes[0]
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [prefix])
        return defs.resolve_job_def(job).execute_in_process(
            instance=instance, partition_key=prefix if job == PREFIX_JOB_NAME else None, raise_on_error=False
        )


def _the_one_failure(result: ExecuteInProcessResult, step: str) -> str:
    """The step's failure message, checked to be a Failure's (not a library's error) and never retried."""
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == step
    data = failure.step_failure_data
    assert data.error is not None and data.error.cls_name == "Failure", data.error.to_string()
    assert data.user_failure_data is not None and data.user_failure_data.description is not None
    assert [e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY] == []
    return data.user_failure_data.description


def _everything_said(result: ExecuteInProcessResult) -> str:
    return "\n".join(str(event.message) for event in result.all_events) + "\n".join(
        str(event.step_failure_data.error) for event in result.get_step_failure_events()
    )


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "AccessDenied"])
@pytest.mark.parametrize("job", [SALES_JOB_NAME, PREFIX_JOB_NAME, SEARCH_INDEX_JOB_NAME])
def test_s3_denying_the_lake_fails_the_step_with_one_line_naming_the_bucket_and_no_retry(
    job: str, code: str, refusing_s3: RefusingS3, own_dataset: SampleDataset
) -> None:
    key, secret = refusing_s3.keys[code]
    lake_uri = f"s3://{BUCKET}/lake"
    s3 = ImgembS3Resource(endpoint_url=refusing_s3.endpoint, aws_access_key_id=key, aws_secret_access_key=secret)

    result = _run(job, own_dataset, lake_uri, s3)

    message = _the_one_failure(result, FIRST_STEP[job])
    assert message.startswith(f"S3 denied access to the lake ({lake_uri}) in bucket {BUCKET!r}: {code}. "), message
    assert "\n" not in message and "credentials" in message and "polic" in message
    assert secret not in _everything_said(result)


def test_a_lake_root_naming_no_bucket_fails_the_step_with_one_line_and_no_retry(
    refusing_s3: RefusingS3, own_dataset: SampleDataset
) -> None:
    result = _run(SALES_JOB_NAME, own_dataset, "s3://", ImgembS3Resource(endpoint_url=refusing_s3.endpoint))

    message = _the_one_failure(result, tables.SALES)
    assert message == "the lake root 's3://' names no bucket: write s3://<bucket>/<folder>"


DENIED_LINE = f"S3 denied access to the lake (s3://{BUCKET}/lake) in bucket {BUCKET!r}"


@pytest.mark.parametrize(
    ("lake_uri", "code", "expected"),
    [
        (f"s3://{BUCKET}/lake", "InvalidAccessKeyId", f"{DENIED_LINE}: InvalidAccessKeyId. "),
        (f"s3://{BUCKET}/lake", "AccessDenied", f"{DENIED_LINE}: AccessDenied. "),
        ("s3://", "InvalidAccessKeyId", "the lake root 's3://' names no bucket: write s3://<bucket>/<folder>"),
    ],
    ids=["wrong-keys", "no-permission", "bare-s3"],
)
@pytest.mark.parametrize("command", [["discover"], ["similar", "img_000001"]], ids=["discover", "similar"])
def test_imgemb_refuses_a_lake_it_cannot_use_in_one_error_line_with_exit_2(
    command: list[str],
    lake_uri: str,
    code: str,
    expected: str,
    refusing_s3: RefusingS3,
    own_dataset: SampleDataset,
    tmp_path: Path,
) -> None:
    key, secret = refusing_s3.keys[code]
    location = {
        "IMGEMB_RAW_IMAGES_URI": own_dataset.raw_images_uri,
        "IMGEMB_SALES_URI": own_dataset.sales_uri,
        "IMGEMB_LAKE_URI": lake_uri,
    }
    env = (
        user_shell_env(location)
        | client_environment(refusing_s3.endpoint)
        | {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "DAGSTER_HOME": str(tmp_path),
        }
    )
    imgemb = Path(sys.executable).with_name("imgemb")

    done = subprocess.run([str(imgemb), *command], env=env, capture_output=True, text=True, timeout=300, check=False)

    said = done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, said
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), said
    assert "Traceback" not in said and secret not in said


def test_a_pyarrow_read_beside_the_lake_refused_by_s3_becomes_the_same_line(refusing_s3: RefusingS3) -> None:
    """The search index and staged vectors are read with pyarrow, which words a 403 its own way."""
    key, secret = refusing_s3.keys["InvalidAccessKeyId"]
    settings = S3Settings(endpoint_url=refusing_s3.endpoint, aws_access_key_id=key, aws_secret_access_key=secret)
    lake = Lake(f"s3://{BUCKET}/lake", storage_options=settings.delta_storage_options())
    location = arrow_location(lake.table_uri("_search_index"), lake.current_storage_options())

    with pytest.raises(OSError) as raised:
        location.filesystem.get_file_info(location.file("manifest.json"))

    refusal = lake.denied_access_refusal(raised.value)
    assert refusal is not None and str(refusal).startswith(f"{DENIED_LINE}: "), raised.value
    assert secret not in str(refusal)
