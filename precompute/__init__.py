"""The producer: dataset -> cache.

sources (read raw items) -> preprocess (decode, geometry, conditioning image with the same
geometry) -> encoders (VAE posterior and SDXL prompt embeddings; compute only) -> shards writer.
The runner composes them; each process of a distributed run owns a disjoint set of output shards.
Also ships the offline tiny SDXL builder (`precompute.tiny`) and the fill dataset generator
(`precompute.fill`) that tests and the demo run on.
"""
