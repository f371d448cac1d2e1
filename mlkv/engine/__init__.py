"""The HybridLog engine: index, log, device, policies and batched operations. No torch here."""
