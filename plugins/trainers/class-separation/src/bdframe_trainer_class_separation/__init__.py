"""bdframe training stage: class-separation (DBR intra-class loss)."""
