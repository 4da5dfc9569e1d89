"""bdframe scorer: MeCa adversarial-KL consistency (-KL between p(x) and p(x + m*delta))."""
