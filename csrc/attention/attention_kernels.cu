// Filled in by the attention/attention op family.
