"""bdframe attack: TaCT source-specific patch trigger with cover samples."""
