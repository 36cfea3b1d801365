"""`lorakit train` under torchrun with one rank made to fail: rank FAIL_RANK raises a ValueError when it reaches
micro-batch FAIL_AT (env), as a bad row or a full disk would. Used by test_distributed.py."""
import os
import sys

from lorakit.cli.main import main
from lorakit.train import batches

if os.environ.get("RANK") == os.environ["FAIL_RANK"]:
    _get = batches.MicroBatches.get

    def get(self, m):
        if m >= int(os.environ["FAIL_AT"]):
            raise ValueError(f"injected failure at micro-batch {m}")
        return _get(self, m)

    batches.MicroBatches.get = get

sys.exit(main(sys.argv[1:]))
