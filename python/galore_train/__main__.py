"""``python -m galore_train`` (also under torchrun) is ``galore-train``."""
import sys

from .cli import main

sys.exit(main())
