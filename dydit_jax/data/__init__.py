"""Data: embedded MNIST demo set, ImageNet / ImageFolder -> latent shards, grain reader, synthetic data.

All sources give host-local batches `{"x": (B,H,W,C) float32, "y": (B,) int32}` through one
`BatchIterator` with a JSON-able position (`get_state` / `set_state`).
"""
from dydit_jax.data.factory import make_dataset
from dydit_jax.data.encode import encode_to_shards
from dydit_jax.data.imagenet import ImageFolder, center_crop_arr, prepare_image_folder, prepare_imagenet
from dydit_jax.data.latents import LatentShardSource, LatentShardWriter, read_metadata
from dydit_jax.data.mnist import MnistSource, load_mnist
from dydit_jax.data.pipeline import BatchIterator, Source
from dydit_jax.data.synthetic import SyntheticSource

__all__ = [
    "BatchIterator", "ImageFolder", "LatentShardSource", "LatentShardWriter", "MnistSource", "Source",
    "SyntheticSource", "center_crop_arr", "encode_to_shards", "load_mnist", "make_dataset",
    "prepare_image_folder", "prepare_imagenet", "read_metadata",
]
