"""One S3 configuration, and every client derived from it.

boto3 (listing and reading objects, including the sales parquet) and delta-rs
(Delta tables) get their endpoint, region and credentials from `S3Settings`, so an
S3-compatible store (MinIO, moto) is reached by setting the endpoint once. The
standard AWS variables and the boto3 credential chain (environment, profiles,
SSO, instance roles) apply to both: credentials are resolved through boto3 and
handed to delta-rs, never logged or put into metadata.

Temporary credentials (an assumed role, IRSA, a container or instance role)
expire, often after an hour. delta-rs takes credentials as plain strings, so
`DeltaStorageOptions` hands it the boto3 session's current ones each time a
Delta operation starts, and boto3 refreshes them before they expire.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

RETRY_MODES: Final = ("standard", "adaptive")
# The region a client uses when neither the settings, the environment nor a profile names one.
DEFAULT_REGION: Final = "us-east-1"
_TRUE_VALUES: Final = frozenset({"1", "true", "yes", "on"})


class S3ConfigError(ValueError):
    """The S3 settings are invalid; the message never contains a credential."""


class S3AccessDenied(S3ConfigError):
    """S3 refused the request (HTTP 403: unknown keys, a bad signature, a bucket or IAM policy); the message
    names the bucket and S3's error code, never a credential or the client's own error text."""


# S3's answers that concern who asks, not one object: the same request fails the same way until the
# credentials or the policies change.
_DENIED_CODES: Final = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "RequestTimeTooSkewed",
)
# A 403 too, but about one archived object (Glacier), not who asks.
_ONE_OBJECT_REFUSED: Final = "InvalidObjectState"
# delta-rs (object_store) quotes S3's XML answer after its status line; pyarrow names the AWS SDK's error.
_XML_CODE: Final = re.compile(r"<Code>(\w+)</Code>")
_FORBIDDEN: Final = re.compile(r"\b403 Forbidden\b")
_SDK_DENIED: Final = re.compile(
    r"AWS Error (ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH"
    r"|UNRECOGNIZED_CLIENT|REQUEST_TIME_TOO_SKEWED)\b"
)


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and how to talk to it; unset values fall back to the AWS defaults and variables."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region_name: str | None = None  # else AWS_REGION / AWS_DEFAULT_REGION / profile, else us-east-1
    profile_name: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    allow_http: bool | None = None  # else AWS_ALLOW_HTTP, else true only for an http:// endpoint
    max_attempts: int = 5  # in total, the first try included
    retry_mode: str = "standard"
    max_pool_connections: int = 32  # bounds concurrent GETs per client
    connect_timeout_s: float = 10.0
    # Per request: a stalled connection is dropped and the request retried
    # (botocore's read timeout; delta-rs's whole-request timeout).
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise S3ConfigError(f"retry mode must be one of {RETRY_MODES}, got {self.retry_mode!r}")
        if self.max_attempts < 1:
            raise S3ConfigError(f"max attempts must be at least 1, got {self.max_attempts}")
        if self.max_pool_connections < 1:
            raise S3ConfigError(f"max pool connections must be at least 1, got {self.max_pool_connections}")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise S3ConfigError("connect and read timeouts must be positive")

    @classmethod
    def from_attributes(cls, source: object) -> S3Settings:
        """The settings from `source`'s attributes of the same names (a config object that mirrors every field)."""
        return cls(**{setting.name: getattr(source, setting.name) for setting in fields(cls)})

    def resolved_endpoint(self, environ: Mapping[str, str] | None = None) -> str | None:
        env = os.environ if environ is None else environ
        return self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None

    def session(self) -> boto3.session.Session:
        return boto3.session.Session(
            profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            region_name=self.region_name,
        )

    def client(self) -> Any:
        """A boto3 S3 client with bounded connection pool and botocore retries."""
        session = self.session()
        return session.client(
            "s3",
            endpoint_url=self.resolved_endpoint(),
            region_name=session.region_name or DEFAULT_REGION,
            config=self.botocore_config(),
        )

    def botocore_config(self, **options: Any) -> Config:
        """botocore's retries, connection pool and timeouts from these settings, with `options` added, for any AWS
        client built from them (S3 here, SQS for the bucket's event queue)."""
        return Config(
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            **options,
        )

    def delta_storage_options(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """delta-rs storage options equivalent to `client()`: same endpoint, region and credentials.

        A snapshot: temporary credentials in it expire. A long-lived holder takes
        `delta_storage_options_provider()` instead.
        """
        return self.delta_storage_options_provider(environ)()

    def delta_storage_options_provider(self, environ: Mapping[str, str] | None = None) -> DeltaStorageOptions:
        """A function returning `delta_storage_options()` with the credentials current when it is called."""
        env = os.environ if environ is None else environ
        session = self.session()
        return DeltaStorageOptions(self._delta_settings(session, env), session.get_credentials())

    def _delta_settings(self, session: boto3.session.Session, env: Mapping[str, str]) -> dict[str, str]:
        options = {
            "AWS_REGION": session.region_name or DEFAULT_REGION,
            # delta-rs retries throttling, 5xx, resets and timeouts itself, with
            # its own policy (10 retries within 3 minutes), kept as it is.
            "timeout": f"{round(self.read_timeout_s * 1000)}ms",
            "connect_timeout": f"{round(self.connect_timeout_s * 1000)}ms",
        }
        endpoint = self.resolved_endpoint(env)
        if endpoint:
            options["AWS_ENDPOINT_URL"] = endpoint
        if self._allow_http(endpoint, env):
            options["AWS_ALLOW_HTTP"] = "true"
        return options

    def _allow_http(self, endpoint: str | None, env: Mapping[str, str]) -> bool:
        if self.allow_http is not None:
            return self.allow_http
        if "AWS_ALLOW_HTTP" in env:
            return env["AWS_ALLOW_HTTP"].strip().lower() in _TRUE_VALUES
        return bool(endpoint and endpoint.startswith("http://"))


class DeltaStorageOptions:
    """delta-rs storage options whose credentials are read from boto3 at each call.

    boto3's credentials for a role (assumed, IRSA, container, instance, SSO) are
    `RefreshableCredentials`: reading them refreshes them when they are within
    15 minutes of expiring, so each Delta operation starts with credentials valid
    for at least 10 more minutes (botocore's mandatory refresh window). Static
    keys come back unchanged. One instance keeps one boto3 credential object, so
    a refresh is one call to the credential source, not one per operation.

    Chosen over delta-rs's own credential chain, which would refresh within an
    operation too: delta-rs 1.6.6 does not resolve the same chain as boto3 (with
    only AWS_CONTAINER_CREDENTIALS_FULL_URI set, the EKS Pod Identity case, it
    went to the instance metadata endpoint instead), and an explicit profile or
    keys in the `s3` resource config would not reach it; the two clients would
    no longer share one identity.
    """

    def __init__(self, settings: Mapping[str, str], credentials: Any | None) -> None:
        self._settings = dict(settings)
        self._credentials = credentials  # botocore Credentials, or None when no credential is configured

    def __call__(self) -> dict[str, str]:
        options = dict(self._settings)
        if self._credentials is not None:
            frozen = self._credentials.get_frozen_credentials()
            options["AWS_ACCESS_KEY_ID"] = frozen.access_key
            options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            if frozen.token:
                options["AWS_SESSION_TOKEN"] = frozen.token
        return options

    def __repr__(self) -> str:  # never the credentials
        return f"DeltaStorageOptions({sorted(self._settings)})"


def refuse_credentials_in_uri(uri: str) -> None:
    """Refuse `s3://key:secret@bucket/...` without repeating it: a URI is echoed in errors, logs and metadata."""
    if not uri.startswith("s3://"):
        return
    authority = uri[len("s3://") :].partition("/")[0]
    if "@" in authority:
        bucket = authority.rpartition("@")[2]
        raise S3ConfigError(
            f"an s3:// URI carries credentials (s3://<credentials>@{bucket}/...): remove them from the URI and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role instead"
        )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> (`bucket`, `a/b`); the key prefix has no leading or trailing slash."""
    refuse_credentials_in_uri(uri)
    if not uri.startswith("s3://"):
        raise S3ConfigError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise S3ConfigError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")


def access_denied_refusal(error: BaseException, uri: str, what: str) -> S3AccessDenied | None:
    """`error` (or one it was raised from) as one line naming `what` and its bucket, when it is S3 denying access.

    boto3, delta-rs and pyarrow each word a 403 their own way, in messages of many lines (request
    URLs, XML); the line says only the bucket, S3's code and what to check. `uri` must already be
    free of credentials (`refuse_credentials_in_uri`).
    """
    if not uri.startswith("s3://"):
        return None
    code = next((found for cause in _causes(error) if (found := _denied_code(cause)) is not None), None)
    if code is None:
        return None
    bucket = uri[len("s3://") :].partition("/")[0]
    return S3AccessDenied(
        f"S3 denied access to {what} ({uri}) in bucket {bucket!r}: {code}. Check the credentials it is reached "
        "with (AWS_ACCESS_KEY_ID / AWS_PROFILE / the role, or the s3 resource's keys) and the bucket's and "
        "the identity's policies"
    )


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _denied_code(error: BaseException) -> str | None:
    """S3's error code (or `HTTP 403`) when `error` is S3 denying access, else None."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED_CODES or (status == 403 and code != _ONE_OBJECT_REFUSED):
            return code or "HTTP 403"
        return None
    if not isinstance(error, OSError):  # delta-rs and pyarrow raise their S3 errors as OSError
        return None
    text = str(error)
    if (sdk := _SDK_DENIED.search(text)) is not None:
        return sdk.group(1)
    if _FORBIDDEN.search(text) is None:
        return None
    xml = _XML_CODE.search(text)
    if xml is None:
        return "HTTP 403"
    return None if xml.group(1) == _ONE_OBJECT_REFUSED else xml.group(1)
