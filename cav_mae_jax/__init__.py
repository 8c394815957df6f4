"""cav-mae-jax: CAV-MAE (Contrastive Audio-Visual Masked Autoencoder) in JAX/Flax."""

__version__ = "0.1.0"
