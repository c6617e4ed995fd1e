"""The consumer: cache -> trained T2I-Adapter.

data (stream, verify and batch the shards named in the manifest) -> step (the reference
objective on a frozen UNet) -> loop (accelerate, optimizer, schedule, logging) -> checkpoint
(atomic save, exact resume) -> validation (images from StableDiffusionXLAdapterPipeline).
Loads no VAE encoder and no text encoders during the loop.
"""
