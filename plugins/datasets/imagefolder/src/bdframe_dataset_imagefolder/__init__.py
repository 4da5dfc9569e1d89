"""bdframe dataset: any image folder tree with train/ and test/ splits."""
