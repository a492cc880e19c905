"""Split fine-tuning (``sharing.mode = "split"``), one package split by role:

- ``mode``: the sharing mode and the in-process cut (an autograd function whose forward is the
  client → server message and whose backward is the answer), used by simulations;
- ``payload``: the round's payload, ``SplitUpdate``, and the pipeline stage that makes it (only
  the client's bottom part travels) and merges it back on the server;
- ``codec``: the cut's tensors as bytes (float32, bfloat16, int8 + scale) and their size bound;
- ``client`` and ``server``: the two halves of the per-batch exchange across processes; the
  transport is ``fedfm.deploy`` (the ``SplitStep`` RPC).
"""

from fedfm.sharing.split import mode as _mode  # noqa: F401  (registration)
from fedfm.sharing.split import payload as _payload  # noqa: F401
