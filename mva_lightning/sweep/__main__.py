"""``python -m mva_lightning.sweep run_dir=DIR [overrides]``: see :mod:`mva_lightning.sweep.cli`."""

from mva_lightning.sweep.cli import main

if __name__ == "__main__":
    main()
