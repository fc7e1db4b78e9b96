"""Networks (t5), the model wrapper (base), losses, and checkpoint import (hf)."""
