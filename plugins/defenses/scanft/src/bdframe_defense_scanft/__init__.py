"""bdframe defense plugin: SCAnFT."""
