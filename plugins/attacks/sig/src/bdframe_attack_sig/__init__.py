"""bdframe attack: SIG sinusoidal signal (clean-label, all-to-one)."""
