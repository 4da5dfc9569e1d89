"""Small-image networks for bdframe (see :mod:`bdframe_models_cifar.plugin`)."""
