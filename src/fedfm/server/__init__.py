"""The server's driver: the round loop (``driver``), one round as a function (``round``, ``tally``),
FedBuff's asynchronous loop (``asynchronous``), the checkpoint, cohort sampling, and what runs
beside the rounds (personalization scores, baselines)."""
