"""The CrystaL method: two paths through one model, sharing one latent block."""
