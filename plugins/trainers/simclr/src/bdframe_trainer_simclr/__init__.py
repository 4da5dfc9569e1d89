"""bdframe training stage: simclr."""
