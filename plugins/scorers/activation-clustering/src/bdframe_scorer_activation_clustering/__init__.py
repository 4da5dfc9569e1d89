"""bdframe scorer: Activation Clustering (per-class 2-means on reduced features)."""
