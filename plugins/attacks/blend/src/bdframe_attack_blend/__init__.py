"""bdframe attack: Blend whole-image blended trigger (dirty-label, all-to-one)."""
