"""bdframe training stage: unlearning (gradient ascent on the forget set, optional flooding or LGA)."""
