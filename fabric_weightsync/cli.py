"""``python -m fabric_weightsync.cli run ...``: Lightning's ``fabric run``, with this package's strategy names known.

``fabric run --strategy`` accepts only the names in Fabric's registry when its CLI module is imported, before the
script (and so this package) is: ``ddp_weightsync`` is refused there. Importing this package first registers it;
everything else is Lightning's own CLI (``run`` starts torchrun with the ``LT_*`` settings, ``consolidate``).
"""

# Runs after this package's __init__ (Python imports the parent first), which registered the strategy names.
from lightning.fabric.cli import _main

if __name__ == "__main__":
    _main()
