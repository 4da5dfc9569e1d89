"""bdframe defense: DBD (decoupling the training process)."""
