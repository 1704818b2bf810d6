"""Stage-1 losses: LPIPS, DINO discriminator, DiffAug, GAN losses."""
