"""`python -m lorakit ...` is the `lorakit` command: the entry point torchrun and accelerate launch start."""

import sys

from lorakit.cli import main

sys.exit(main())
