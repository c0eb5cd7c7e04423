"""noisy_student: Noisy Student self-training in JAX (Xie et al., CVPR 2020)."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.9,<0.11",
  "flax>=0.12,<0.13",
  "optax>=0.2.5,<0.3",
  "orbax-checkpoint>=0.11,<0.13",
  "tensorflow-cpu>=2.19,<2.22",
  "tensorflow-datasets>=4.9.8,<4.10",
  # tfds builders that live inside a package need it; tfds does not pull it in.
  "importlib_resources>=6",
  "clu>=0.0.12,<0.1",
  # clu's metric writers fail to import without it; clu does not pull it in.
  "tensorboard>=2.19,<2.22",
  "ml_collections>=1.0,<2",
  "etils[epath]>=1.7",
  "matplotlib>=3.8",
  "scikit-learn>=1.4",  # ships the embedded digits dataset
  "numpy>=1.26",
  # The CPU entry points run under mimalloc (noisy_student/cpu/allocator.py): faster steps and compiles.
  "cmeel-mimalloc>=3.2; platform_system=='Linux'",
]

setuptools.setup(
  name="noisy_student",
  version="0.1.0",
  description="Noisy Student self-training (Xie et al., CVPR 2020) in JAX/Flax, TPU-first.",
  python_requires=">=3.10",
  packages=setuptools.find_packages(include=["noisy_student", "noisy_student.*"]),
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "keras>=3.8,<4",  # parity tests against keras.applications.EfficientNet
      "av>=14",  # the ImageNet-P reader's tests write and read videos
      "ruff==0.17.6",  # lint and format check (pyproject.toml); pinned so formatting is stable
      # XLA's TPU compiler for the compile-only tests (mode=compile): the pin of jax[tpu]==0.10.2.
      "libtpu==0.0.42.*; platform_system=='Linux' and platform_machine=='x86_64'",
    ],
    # ImageNet-P's perturbation videos (config.evaluate.suites=imagenet_p) are decoded with PyAV.
    "video": ["av>=14"],
    "tpu": ["jax[tpu]>=0.9,<0.11"],
  },
  entry_points={"console_scripts": ["noisy_student=noisy_student.__main__:run"]},
)
