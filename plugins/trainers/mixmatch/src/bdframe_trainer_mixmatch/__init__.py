"""bdframe training stage: mixmatch."""
