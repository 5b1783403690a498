"""ipadapter-jax."""
