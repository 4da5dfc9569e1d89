"""bdframe defense plugins: FineTuning and FinePruning."""
