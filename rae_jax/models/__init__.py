"""Flax models: DiTDH, LightningDiT, ViT decoder, frozen encoders, RAE wrapper."""
