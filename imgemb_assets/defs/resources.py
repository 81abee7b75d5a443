"""Where the data lives and how the model is built, as Dagster resources."""


from dagster import ConfigurableResource
from pydantic import Field

from imgemb_assets.core.model_config import DEFAULT_BATCH_SIZE, EmbeddingSettings
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.storage import ObjectStore, open_object_store


class StorageResource(ConfigurableResource):
    """The three roots: raw images (one folder or S3 prefix per partition), sales parquet, Delta lake."""

    raw_images_uri: str = Field(description="Root holding <prefix>/<image_id>.<ext> objects.")
    sales_uri: str = Field(description="Root holding the sales export as .parquet files.")
    lake_uri: str = Field(description="Root under which each asset writes its Delta table.")

    def raw_images(self) -> ObjectStore:
        return open_object_store(self.raw_images_uri)

    def sales(self) -> ObjectStore:
        return open_object_store(self.sales_uri)

    def lake(self) -> Lake:
        return Lake(self.lake_uri)


class EmbeddingModelResource(ConfigurableResource):
    """The embedding model's settings; see `EmbeddingSettings` for what each value means."""

    weights: str = Field(
        description="DEFAULT (torchvision's pretrained weights), a state-dict path, or random / random:<seed>."
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, description="Images per forward pass.")

    def settings(self) -> EmbeddingSettings:
        return EmbeddingSettings(weights=self.weights, device=self.device, batch_size=self.batch_size)
