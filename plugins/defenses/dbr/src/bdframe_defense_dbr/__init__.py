"""bdframe defenses: DBR (FCT split, D-BR backdoor removal, D-ST secure training)."""
