"""Training: the LightningModule, its stages, reference cache, MI penalty, losses and methods."""
