/* The core's status codes in words (for the torch layer's error messages). */
#include "slothai.h"

const char *slothai_status_string(slothai_status s)
{
    switch (s) {
    case SLOTHAI_OK: return "ok";
    case SLOTHAI_EINVAL: return "invalid argument";
    case SLOTHAI_ECUDA: return "CUDA error";
    }
    return "unknown status";
}
