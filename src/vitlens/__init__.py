"""vitlens: fine-tune Vision Transformers with Lightning and see what they look at."""
import os as _os

# albumentations checks PyPI for updates on import; there is no network here.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
