"""Latent reasoning: how many latent slots a step uses (schedules) and, later, how they are filled."""
