"""Stable-Baselines3 integration: agents that act on VAE latents or on pixels."""
