"""Example third-party bdframe attack ``corner-noise`` (see :mod:`.plugin`)."""
