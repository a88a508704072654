// Filled in by the attention/attention op family.
#include <torch/library.h>
