"""bdframe defense 'meca': MeCa iterative backdoor enhancement, detection and clean retraining."""
