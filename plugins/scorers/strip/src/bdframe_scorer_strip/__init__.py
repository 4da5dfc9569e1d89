"""bdframe scorer: STRIP superimposition entropy (-H)."""
