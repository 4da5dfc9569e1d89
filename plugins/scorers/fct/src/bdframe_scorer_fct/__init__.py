"""bdframe scorer: FCT feature consistency towards transformations (D-BR/D-ST)."""
