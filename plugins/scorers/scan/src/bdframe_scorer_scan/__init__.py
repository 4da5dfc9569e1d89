"""bdframe scorer: SCAn statistical contamination analyzer (two-component decomposition)."""
