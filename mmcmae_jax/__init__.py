"""mmcmae_jax: M3 (Multi-Modal Contrastive Masked Autoencoders) for RGB-D pre-training in JAX/Flax.

The method and the defaults chosen where the paper is silent are described in README.md and docs/.
"""

__version__ = "0.1.0"
