"""One S3 configuration, and every client derived from it.

boto3 (listing and reading objects, including the sales parquet) and delta-rs
(Delta tables) get their endpoint, region and credentials from `S3Settings`, so an
S3-compatible store (MinIO, moto) is reached by setting the endpoint once. The
standard AWS variables and the boto3 credential chain (environment, profiles,
SSO, instance roles) apply to both: credentials are resolved through boto3 and
handed to delta-rs, never logged or put into metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import boto3
from botocore.config import Config

RETRY_MODES: Final = ("standard", "adaptive")
_DEFAULT_REGION: Final = "us-east-1"
_TRUE_VALUES: Final = frozenset({"1", "true", "yes", "on"})


class S3ConfigError(ValueError):
    """The S3 settings are invalid; the message never contains a credential."""


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
            region_name=session.region_name or _DEFAULT_REGION,
            config=Config(
                retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
                max_pool_connections=self.max_pool_connections,
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
            ),
        )

    def delta_storage_options(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """delta-rs storage options equivalent to `client()`: same endpoint, region and credentials."""
        env = os.environ if environ is None else environ
        session = self.session()
        options = {
            "AWS_REGION": session.region_name or _DEFAULT_REGION,
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
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            options["AWS_ACCESS_KEY_ID"] = frozen.access_key
            options["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
            if frozen.token:
                options["AWS_SESSION_TOKEN"] = frozen.token
        return options

    def _allow_http(self, endpoint: str | None, env: Mapping[str, str]) -> bool:
        if self.allow_http is not None:
            return self.allow_http
        if "AWS_ALLOW_HTTP" in env:
            return env["AWS_ALLOW_HTTP"].strip().lower() in _TRUE_VALUES
        return bool(endpoint and endpoint.startswith("http://"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b/` -> (`bucket`, `a/b`); the key prefix has no leading or trailing slash."""
    if not uri.startswith("s3://"):
        raise S3ConfigError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise S3ConfigError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")
