"""bdframe model plugin: any timm architecture by name."""
