"""bdframe attack: WaNet warping trigger with noise-mode cover samples (dirty-label, all-to-one)."""
