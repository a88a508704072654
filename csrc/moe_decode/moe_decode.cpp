// Filled in by the moe_decode/moe_decode op family.
#include <torch/library.h>
