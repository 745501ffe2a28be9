"""Replicated serving on a real (local) Ray Serve cluster: `make test-scale` runs these, after installing
lorakit[ray]; `make test`'s pytest does not collect them (they need Ray and take minutes)."""

import os

if not os.environ.get("LORAKIT_TEST_SCALE"):
    collect_ignore_glob = ["test_*.py"]
