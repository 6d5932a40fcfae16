import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# The interpreter tests need TRITON_INTERPRET=1 before Triton is imported, so they run in their own
# process (make test runs both); the main run, which compiles kernels ahead of time, skips the folder.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton_interp"]
