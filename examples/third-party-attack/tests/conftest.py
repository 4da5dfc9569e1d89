# bdframe.testing is an opt-in pytest plugin: fixtures such as `bdframe_registry`.
pytest_plugins = ["bdframe.testing"]
