import torch._inductor.config as _c
_c.fallback_random = True
