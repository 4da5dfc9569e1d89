"""bdframe scorer: ABL per-sample loss score (-CE)."""
