"""bdframe scorer: sce (DBD symmetric cross-entropy)."""
