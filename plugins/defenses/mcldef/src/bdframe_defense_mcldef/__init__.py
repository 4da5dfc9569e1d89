"""bdframe defense plugin: MCLDef."""
