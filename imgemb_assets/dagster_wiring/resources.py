"""Where the data lives and how the model is built, as Dagster resources."""

from typing import Any, Literal

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from imgemb_assets.core.embedding.drift import DriftThresholds
from imgemb_assets.core.embedding.model_settings import (
    BackboneName,
    DecoderName,
    EmbeddingSettings,
    PrecisionName,
    RuntimeName,
    model_code_version,
)
from imgemb_assets.core.imaging.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_IMAGE_BYTES, ImageLimits
from imgemb_assets.core.ingest.partition_scheme import DEFAULT_SCHEME_TEXT, PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.scheme_record import require_scheme
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.near_duplicates import DEFAULT_SIMILARITY_THRESHOLD, ShareJumpRule
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.retries import permanent_failures


class ImgembS3Resource(ConfigurableResource):
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


class StorageResource(ConfigurableResource):
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


class EmbeddingModelResource(ConfigurableResource):
    """The embedding model's settings; see `EmbeddingSettings` for what each value means."""

    weights: str = Field(
        description="DEFAULT (torchvision's pretrained weights), a state-dict path, or random / random:<seed>."
    )
    model: BackboneName = Field(default="resnet50", description="torchvision backbone.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: int | None = Field(default=None, description="Images per forward pass; default 256 on CUDA, 16 on CPU.")
    precision: PrecisionName = Field(default="auto", description="auto: fp16 + channels_last on CUDA, fp32 on CPU.")
    compile: bool | None = Field(
        default=None,
        description="torch.compile with CUDA graphs for the fixed batch shape. Unset: on for CUDA, off for CPU; "
        "a failed compile then leaves the model eager. true: compile or fail the step.",
    )
    decoder: DecoderName = Field(
        default="auto",
        description="What decodes the thumbnails: auto (nvimgcodec, else nvjpeg, else pillow on CUDA; pillow on "
        "CPU), pillow, nvjpeg or nvimgcodec (needs the gpu extra: nvidia-nvimgcodec-cu13[nvjpeg]).",
    )
    runtime: RuntimeName = Field(
        default="auto",
        description="auto: cpu-tuned on CPU (channels_last, glibc malloc keeping activation buffers mapped: vectors "
        "within 5e-7 of eager's, no page-fault storm), eager on CUDA; eager: the module as torchvision builds it.",
    )

    def code_version(self) -> str:
        """The embedding asset's code version for these weights and backbone (see `model_code_version`).

        Read when the location loads: the weights variable, if unset there, gives `unset`.
        """
        weights = self.weights.get_value() if isinstance(self.weights, EnvVar) else self.weights
        return model_code_version(self.model, weights or "unset")

    def settings(self) -> EmbeddingSettings:
        return EmbeddingSettings(
            weights=self.weights,
            device=self.device,
            batch_size=self.batch_size,
            model=self.model,
            precision=self.precision,
            compile=self.compile,
            runtime=self.runtime,
            decoder=self.decoder,
        )


class ImageLimitsResource(ConfigurableResource):
    """What an original image may cost before it is rejected (with the reason) instead of decoded."""

    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, description="Larger objects are rejected without being downloaded."
    )
    max_image_pixels: int | None = Field(
        default=None,
        description="Larger images are rejected before decoding; default: Pillow's decompression-bomb limit.",
    )
    max_decode_bytes: int = Field(
        default=DEFAULT_MAX_DECODE_BYTES,
        description="Memory the images decoded at once may take, estimated from their headers (an image estimated "
        "above it decodes alone).",
    )
    full_size_jpeg_decode: bool = Field(
        default=False,
        description="Decode every JPEG at its full size before the bilinear resize to 224x224, as the article does. "
        "Default (false): a JPEG at least twice 224 px on both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT "
        "domain first (Pillow's draft), which is faster and needs far less memory but gives slightly different "
        "thumbnails and vectors (see the README). PNG and WebP are always decoded at full size. Changing it "
        "makes every stored thumbnail again.",
    )

    def limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_decode_bytes=self.max_decode_bytes,
            full_size_jpeg_decode=self.full_size_jpeg_decode,
        )


class QualityThresholds(ConfigurableResource):
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


class SimilaritySettings(ConfigurableResource):
    """What the search index, near-duplicate and evaluation assets use (`dagster_wiring/similarity.py`, `dagster_wiring/evaluation.py`)."""

    evaluation_label_column: str = Field(
        default="category",
        description="The sales column whose values the evaluation asks the embeddings to separate "
        "(silhouette, kNN label agreement); without it only the similarity distribution is reported.",
    )
    near_duplicate_threshold: float = Field(
        default=DEFAULT_SIMILARITY_THRESHOLD,
        description="Two images whose embeddings have at least this cosine similarity are near duplicates.",
    )
    max_near_duplicate_share_jump_points: float = Field(
        default=ShareJumpRule.max_points_above_median,
        description="Warn when a partition's share of images with a near duplicate is more than this many "
        "percentage points above the median of the previous partitions'.",
    )

    def share_jump_rule(self) -> ShareJumpRule:
        return ShareJumpRule(max_points_above_median=self.max_near_duplicate_share_jump_points)
