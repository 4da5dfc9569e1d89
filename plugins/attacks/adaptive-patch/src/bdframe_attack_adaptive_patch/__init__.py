"""bdframe attack: Adaptive-Patch multiple patch triggers with cover samples (dirty-label, all-to-one)."""
