"""bdframe attack: PhysicalBA patch trigger with training-time physical transformations (dirty-label, all-to-one)."""
