"""bdframe attack: BadNet patch trigger (dirty-label, all-to-one)."""
