"""bdframe defense plugin: CutMix."""
