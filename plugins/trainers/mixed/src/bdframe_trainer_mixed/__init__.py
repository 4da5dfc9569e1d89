"""bdframe training stage: mixed learn/unlearn step (mean CE on the learn set minus lambda * mean CE on the forget set)."""
