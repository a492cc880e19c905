"""Client systems on a simulated clock: how fast each client trains, how fast its link is, and
when it is online (``profiles``, ``availability``), and what a round or an update costs in virtual
seconds (``clock``). Pure functions of a seed and the work done; the loop and FedBuff call them.
"""
