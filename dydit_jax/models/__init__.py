"""DiT / DyDiT models: geometry (`config`), the NNX network (`dit`), routers, MAC counts, compute copies."""
from dydit_jax.models.config import MODEL_NAMES, ModelConfig, model_config
from dydit_jax.models.dit import DiT

__all__ = ["DiT", "MODEL_NAMES", "ModelConfig", "model_config"]
