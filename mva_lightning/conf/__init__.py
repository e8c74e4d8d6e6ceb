"""The Hydra configs, inside the package: a module, so ``pkg://mva_lightning.conf`` resolves."""
