"""bdframe scorer: SCALE-UP scaled prediction consistency (SPC)."""
