"""The resources every domain's wiring uses: where the data lives (the three roots, S3) and the checks' thresholds."""

from typing import Any, Literal

import dagster as dg
from pydantic import Field

from imgemb_assets.core.embedding.drift import DriftThresholds
from imgemb_assets.core.ingest.partition_scheme import DEFAULT_SCHEME_TEXT, PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.scheme_record import require_scheme
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.location.retries import permanent_failures


class ImgembS3Resource(dg.ConfigurableResource):
    """How to reach S3: endpoint, region, credentials, retries, connection pool.

    The fields dagster-aws's `S3Resource` names the same way mean the same here;
    it is not subclassed because importing dagster-aws costs every process that
    loads the location ~0.65 s, and because its other fields (unsigned session,
    use_ssl, verify) would be accepted and not honoured. Unset values fall back
    to the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP,
    the credential chain). The same settings build the boto3 client and the
    delta-rs storage options (`imgemb_assets.core.storage.s3`).
    """

    endpoint_url: str | None = Field(default=None, description="A custom S3 endpoint (MinIO, a moto server).")
    region_name: str | None = Field(default=None, description="The region; default: AWS_REGION or the profile's.")
    profile_name: str | None = Field(default=None, description="A profile of the AWS config files.")
    aws_access_key_id: str | None = Field(default=None, description="Static credentials; default: the chain.")
    aws_secret_access_key: str | None = Field(default=None, description="Static credentials; default: the chain.")
    aws_session_token: str | None = Field(default=None, description="With temporary static credentials.")
    max_attempts: int = Field(default=5, description="botocore's attempts per request (and body re-reads).")
    retry_mode: Literal["standard", "adaptive"] = Field(default="standard", description="botocore retry mode.")
    max_pool_connections: int = Field(default=32, description="Concurrent connections (and GETs) per client.")
    allow_http: bool | None = Field(
        default=None, description="Allow a plain-http endpoint; default: AWS_ALLOW_HTTP, else true for http://."
    )
    connect_timeout_s: float = Field(default=10.0, description="Seconds to wait for a connection.")
    read_timeout_s: float = Field(
        default=60.0, description="Seconds a request may stall before it is dropped and retried."
    )

    def settings(self) -> S3Settings:
        return S3Settings.from_attributes(self)

    def get_client(self) -> Any:
        return self.settings().client()


class StorageResource(dg.ConfigurableResource):
    """The three roots: raw images (one folder or S3 prefix per partition), sales parquet, Delta lake.

    Each root is a local path or an s3:// URI; `s3` says how to reach S3.
    """

    raw_images_uri: str = Field(description="Root holding <prefix>/<image_id>.<ext> objects.")
    sales_uri: str = Field(description="Root holding the sales export as .parquet files.")
    lake_uri: str = Field(description="Root under which each asset writes its Delta table.")
    s3: ImgembS3Resource
    partition_scheme: str = Field(
        default=DEFAULT_SCHEME_TEXT,
        description="How the raw-images root is cut into partitions (IMGEMB_PARTITION_SCHEME): folders, folders:N, "
        "folders:N,hash:B or hash:B, optionally ,loose:L; see imgemb_assets/core/ingest/partition_scheme.py.",
    )

    def raw_images(self) -> ObjectStore:
        with permanent_failures():  # a root it refuses (a bare s3://) fails the step in one line, unretried
            return open_object_store(self.raw_images_uri, self.s3.settings())

    def scheme(self) -> PartitionScheme:
        return PartitionScheme.parse(self.partition_scheme)

    def partitioned_root(self) -> PartitionedRoot:
        """The raw-images root as the scheme cuts it; one per step or tick (it remembers its listings)."""
        return PartitionedRoot(self.raw_images(), self.scheme())

    def lake_for_partitions(self) -> Lake:
        """The lake, checked to be written with this scheme (recorded in a new lake); SchemeMismatchError if not."""
        lake = self.lake()
        require_scheme(lake, self.scheme())
        return lake

    def sales(self) -> ObjectStore:
        with permanent_failures():
            return open_object_store(self.sales_uri, self.s3.settings())

    def lake(self) -> Lake:
        # A root the lake refuses (a bare s3://, credentials in the URI) fails the step in one line, unretried.
        with permanent_failures():
            if self.lake_uri.startswith("s3://"):
                # Resolved at each Delta operation: a role's credentials may expire during a long step.
                return Lake(self.lake_uri, storage_options=self.s3.settings().delta_storage_options_provider())
            return Lake(self.lake_uri)


class QualityThresholds(dg.ConfigurableResource):
    """Thresholds of the asset checks."""

    min_sales_coverage: float = Field(
        default=0.5, description="Warn when fewer of a partition's images than this have a sales row."
    )
    max_embedding_mean_shift: float = Field(
        default=DriftThresholds.max_mean_shift,
        description="Warn when a partition's mean vector moved further than this from the previous partition's, "
        "in units of the previous partition's total standard deviation.",
    )
    max_embedding_variance_shift: float = Field(
        default=DriftThresholds.max_variance_shift,
        description="Warn when per-dimension variances changed by more than this fraction of the previous total.",
    )
    min_embedding_centroid_cosine: float = Field(
        default=DriftThresholds.min_centroid_cosine,
        description="Warn when the cosine between this and the previous partition's mean vectors is below this.",
    )

    min_vectors_for_drift: int = Field(
        default=DriftThresholds.min_vectors,
        description="Below this many vectors in either partition, drift is not judged (the check says so).",
    )

    def drift_thresholds(self) -> DriftThresholds:
        return DriftThresholds(
            min_vectors=self.min_vectors_for_drift,
            max_mean_shift=self.max_embedding_mean_shift,
            max_variance_shift=self.max_embedding_variance_shift,
            min_centroid_cosine=self.min_embedding_centroid_cosine,
        )
