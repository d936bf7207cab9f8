"""Latent reasoning: the latent block a sample carries (token or recurrent latents) and the
schedules of how many latent slots each step uses."""
