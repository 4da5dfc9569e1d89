"""bdframe training stage: relearning (cross-entropy fine-tuning on a relabelled set)."""
