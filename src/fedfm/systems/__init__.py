"""Client systems on a simulated clock: how fast each client trains, how fast its link is, and
when it is online (``profiles``, ``availability``), and what a round or an update costs in virtual
seconds (``clock``). Pure functions of a seed and the work done; the loop and FedBuff call them.
``ranks``: one client's local training laid out on several real processes (torch.distributed),
used by the client's training step, a deployed ``fedfm client --nproc`` and the Ray engine.
"""
