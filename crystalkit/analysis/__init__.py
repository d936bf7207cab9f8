"""``crystalkit analyze``: does the latent block read the image, does the answer read it, does it
rescue the corrupted path."""
