"""bdframe attack: Adaptive-Blend partial blended trigger with cover samples (dirty-label, all-to-one)."""
