"""Your own Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) script as a fedfm client.

Two lines of a working script change, and no fedfm task is written::

    from fedfm.hf import federate                                  # added
    trainer = Trainer(model=model, args=args, train_dataset=train)  # as it was
    federate(trainer)                                               # was: trainer.train()

``federate`` joins a fedfm server (``fedfm server CONFIG``, or ``fedfm federate CONFIG SCRIPT``
for a simulation on this machine) and trains every round it is given:

1. the global trainable state (PEFT-keyed, as fedfm's own clients hold it: LoRA factors and the
   head) is loaded into ``trainer.model``; the names and shapes must match the server's model,
   or the round fails with the names that differ;
2. the global random state is seeded with the script's seed + round − 1 (``transformers.set_seed``,
   as ``Trainer(...)`` does when it is made: the data order and dropout follow it; it is also
   ``trainer.args.seed``), and the optimizer and learning-rate schedule are made fresh, so
   a round is exactly a plain ``trainer.train()`` from the global model: the script's
   ``TrainingArguments`` decide the local steps or epochs, the optimizer and its schedule (the
   server's ``training.*`` is not used by such a client);
3. the change of the trainable tensors goes back with ``len(trainer.train_dataset)`` as its
   weight, through the client halves of the run's update transforms (clipping and noise for
   client-level DP, compression, secure aggregation's masking), like any fedfm client.

Refused with the reason: DP-SGD (``privacy.dp = "example"`` needs per-example clipping and noise
inside each optimizer step, which fedfm's own loop does with Opacus and a user's ``Trainer`` does
not), objectives that hook each local step (FedProx, SCAFFOLD, FedDyn), personalization,
sharing modes that change the client's model (split, offsite) and heterogeneous LoRA ranks. The
client's per-round state (top-k error feedback) stays with it, as in ``fedfm client``.

Where the client connects comes from the arguments or the environment (``FEDFM_SERVER``,
``FEDFM_TOKEN``, ``FEDFM_CA``, ``FEDFM_CERT``, ``FEDFM_KEY``, ``FEDFM_INSECURE=1``), which is how
``fedfm federate`` starts each client's script.
"""

from __future__ import annotations

import os
import threading
import time
import types

__all__ = ["ScriptTrainer", "federate", "refusal"]


def refusal(cfg) -> str | None:
    """Why a run's config cannot have ``Trainer`` script clients, or None."""
    from fedfm.algorithms.lora import LORA_AGGREGATION
    from fedfm.algorithms.objectives import make_objective
    from fedfm.algorithms.personal import personalizes
    from fedfm.privacy.guarantees import dp_mode
    from fedfm.sharing import sharing_mode

    if dp_mode(cfg).example_level:
        return (
            "privacy.dp = 'example' (DP-SGD) clips and noises every example inside each optimizer step; "
            "a Trainer script's own loop cannot be made to: use client-level DP (privacy.dp = 'client')"
        )
    if not make_objective(cfg.strategy).plain:
        objective = cfg.strategy.objective
        return (
            f"strategy.objective = {objective!r} changes every local step; a Trainer script takes plain ones"
        )
    if personalizes(cfg.personalization):
        return "personalization changes what a client trains and keeps; not available to a Trainer script"
    if sharing_mode(cfg).changes_model:
        return (
            f"sharing.mode = {cfg.sharing.mode!r} changes the client's model; a Trainer script brings its own"
        )
    if cfg.peft.rank_tiers or LORA_AGGREGATION.get(cfg.strategy.lora_aggregation).merges_into_base:
        return (
            "heterogeneous LoRA ranks and aggregations that merge into the base every round need "
            "fedfm's own model handling: leave peft.rank_tiers unset and strategy.lora_aggregation plain"
        )
    return None


class ScriptTrainer:
    """A user's ``transformers.Trainer`` in the place of fedfm's client trainer (``fedfm.deploy.client``)."""

    cut = None  # no split fine-tuning
    registered = False

    def __init__(self, trainer, cfg) -> None:
        import numpy as np

        from fedfm.models.state import trainable_parameters
        from fedfm.transforms.base import Pipeline

        why = refusal(cfg)
        if why is not None:
            raise ValueError(f"this run cannot take a Trainer script as a client: {why}")
        if getattr(trainer, "train_dataset", None) is None:
            raise ValueError("the Trainer has no train_dataset: a client trains on its own data")
        self.hf, self.cfg = trainer, cfg
        self.trainable = trainable_parameters(trainer.model)
        self.pipeline = Pipeline.build(cfg)
        self.seed = int(trainer.args.seed)
        rows = np.arange(len(trainer.train_dataset))
        self.data = types.SimpleNamespace(client_train=[rows])
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def train(self, client_id: int, rows, header: dict, groups: dict, state, secure=None, send=None):
        """One round: load θ, a plain ``trainer.train()``, the delta through the client transforms."""
        from transformers import set_seed

        from fedfm.client.program import ClientJob
        from fedfm.models.state import get_trainable_state, set_trainable_state
        from fedfm.transforms.base import ClientStep
        from fedfm.types import Update
        from fedfm.wire import context_from

        ctx = context_from(dict(header), groups.get("c"), secure)
        start = groups.get("p", {})
        missing, extra = sorted(set(self.trainable) - set(start)), sorted(set(start) - set(self.trainable))
        if missing or extra:
            raise ValueError(
                "the script's trainable tensors differ from the server's: the script has "
                f"{missing[:3]} the server lacks and lacks {extra[:3]} (same model, PEFT method, rank, "
                "target modules and head on both sides)"
            )
        with self.lock:
            set_trainable_state(self.trainable, start)
            hf = self.hf
            hf.args.seed = self.seed + ctx.round - 1
            set_seed(hf.args.seed)  # as Trainer(...) does when it is made: data order, dropout
            hf.optimizer, hf.lr_scheduler = None, None  # fresh each round, as the round starts
            out = hf.train()
            after = get_trainable_state(self.trainable)
        delta = {k: after[k] - start[k].to(after[k].dtype) for k in start}
        metrics = {"train_loss": float(out.training_loss), "steps": float(out.global_step)}
        update = Update(delta, len(hf.train_dataset), metrics)
        state = dict(state or {})
        job = ClientJob(client_id, rows, header.get("rank"))
        return self.pipeline.client(update, ClientStep(job, ctx, state)), state


def federate(
    trainer,
    server: str | None = None,
    *,
    token: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    insecure: bool | None = None,
    retry_s: float = 1.0,
    give_up_s: float = 600.0,
    note=print,
) -> None:
    """Train ``trainer`` as a client of the fedfm server at ``server`` until its run is done.

    Arguments left out come from the environment (``FEDFM_SERVER``, ``FEDFM_TOKEN``, ``FEDFM_CA``,
    ``FEDFM_CERT``, ``FEDFM_KEY``, ``FEDFM_INSECURE``). Raises ``ClientError`` when the server
    refuses the client or its run fails; returns when the run is done."""
    import tomllib

    from fedfm.config import make_config
    from fedfm.deploy.client import ClientError, ClientSecurity, Identity, serve_identity

    env = os.environ.get
    server = server or env("FEDFM_SERVER")
    if not server:
        raise ClientError("federate needs the server's address (server=... or FEDFM_SERVER=host:port)")
    insecure = insecure if insecure is not None else env("FEDFM_INSECURE", "") == "1"
    security = ClientSecurity(
        ca=ca or env("FEDFM_CA"),
        cert=cert or env("FEDFM_CERT"),
        key=key or env("FEDFM_KEY"),
        insecure=insecure,
    )
    ident = Identity(token or env("FEDFM_TOKEN"), None, name=env("FEDFM_NAME", "trainer-script"))
    if not insecure:
        ident.signing = security.identity()
    built: dict = {}

    def trainer_for(reply, stub, metadata) -> ScriptTrainer:
        if "client" not in built:
            cfg = make_config(tomllib.loads(reply.config_toml))
            try:
                built["client"] = ScriptTrainer(trainer, cfg)
            except ValueError as err:
                raise ClientError(str(err)) from None
        return built["client"]

    serve_identity(server, ident, security, trainer_for, retry_s, give_up_s, note)


def simulate(
    config,
    command,
    clients: int,
    *,
    output=None,
    overrides=(),
    round_timeout_s: float = 600.0,
    progress: bool = True,
):
    """A federation on this machine whose clients are a Trainer script: ``command`` (the script
    and its arguments; ``{k}`` in an argument becomes the client's index, 0 … clients − 1) runs as
    ``clients`` processes that ``federate`` with a fedfm server run here (loopback, plaintext).
    Each client's log is kept in ``RUN/clients/siteK.log``. Returns the server's RunResult; a
    client that exits with an error fails the call with its log's last lines."""
    import secrets
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from fedfm.config import load_config
    from fedfm.deploy.client import ClientError, loopback_address
    from fedfm.deploy.server import Security, serve

    if clients < 1:
        raise ValueError("clients must be at least 1")
    cfg = load_config(config, [*overrides, f"partition.num_clients={clients}"])
    why = refusal(cfg)
    if why is not None:  # said once here rather than by every client after it joins
        raise ClientError(f"this run cannot take a Trainer script as a client: {why}")
    folder = Path(tempfile.mkdtemp(prefix="fedfm-federate-"))
    tokens = {k: secrets.token_hex(16) for k in range(clients)}
    (folder / "tokens.txt").write_text("".join(f"site{k} {t}\n" for k, t in tokens.items()))
    address = loopback_address()
    command = [str(c) for c in command]
    head = [sys.executable] if command[0].endswith(".py") else []
    procs = {}
    for k, token in tokens.items():
        env = {
            **os.environ,
            "FEDFM_SERVER": address,
            "FEDFM_TOKEN": token,
            "FEDFM_INSECURE": "1",
            "FEDFM_CLIENT": str(k),
            "FEDFM_NAME": f"site{k}",
        }
        log = open(folder / f"site{k}.log", "w")  # noqa: SIM115 (closed after the run)
        argv = [*head, *(c.replace("{k}", str(k)) for c in command)]
        procs[k] = (subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    result, crashed = None, []
    if threading.current_thread() is threading.main_thread():  # a client that dies stops the run now
        threading.Thread(target=_watch, args=(procs, crashed), daemon=True).start()
    try:
        result = serve(
            cfg,
            address,
            folder / "tokens.txt",
            Security(insecure=True),
            output=output,
            round_timeout_s=round_timeout_s,
            progress=progress,
        )
    except KeyboardInterrupt:
        if not crashed:
            raise
    finally:
        crashed.append(None)  # the watch is over
        failed = []
        for k, (proc, log) in procs.items():
            if result is None:  # the server stopped early: its clients would only retry
                proc.terminate()
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
            if code != 0 and (result is not None or k in crashed):
                failed.append((k, code))
        if result is not None:
            kept = Path(result.run_dir) / "clients"
            kept.mkdir(exist_ok=True)
            for k in procs:
                shutil.copy(folder / f"site{k}.log", kept / f"site{k}.log")
        tails = {k: (folder / f"site{k}.log").read_text()[-1500:] for k, _ in failed}
        shutil.rmtree(folder, ignore_errors=True)
    if failed:
        k, code = failed[0]
        raise ClientError(f"client site{k} exited with {code}; the end of its log:\n{tails[k]}")
    return result


def _watch(procs: dict, crashed: list) -> None:
    """Interrupt the server's run (in the main thread) when a client process exits with an error
    before the run is over; ``crashed`` gets its index (anything there already stops the watch)."""
    import _thread

    while not crashed:
        for k, (proc, _) in procs.items():
            if proc.poll() not in (None, 0):
                crashed.append(k)
                _thread.interrupt_main()
                return
        time.sleep(0.5)
