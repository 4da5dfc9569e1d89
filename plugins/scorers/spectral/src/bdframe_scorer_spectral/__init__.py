"""bdframe scorer: Spectral Signatures (per-class top singular direction)."""
