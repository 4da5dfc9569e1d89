"""bdframe defense plugin: ABL."""
