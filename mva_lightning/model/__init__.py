"""The policy: base models (``backbones``), value vectors (``lora``), log-probs and generation."""
