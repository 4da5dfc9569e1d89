"""bdframe defense plugin: detect."""
