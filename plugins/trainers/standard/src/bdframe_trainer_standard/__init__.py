"""bdframe training stage: standard supervised training (cross-entropy)."""
