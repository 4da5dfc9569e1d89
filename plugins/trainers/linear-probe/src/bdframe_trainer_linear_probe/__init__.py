"""bdframe training stage: linear-probe."""
