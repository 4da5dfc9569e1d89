"""bdframe dataset: a small deterministic generated image dataset."""
