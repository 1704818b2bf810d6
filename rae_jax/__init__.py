"""rae-jax: Diffusion Transformers with Representation Autoencoders in JAX/Flax."""

__version__ = "0.1.0"
