"""bdframe defense plugin: CLP."""
