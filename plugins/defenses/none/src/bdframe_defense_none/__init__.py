"""bdframe defense 'none': plain training on the untrusted data."""
