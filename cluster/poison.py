"""The poison rule: which request, if any, is the cause of the worker deaths it lived through.

A worker can die for reasons of its own (a node lost, an operator's kill, an out-of-memory
kill) or because of one request (a prompt that crashes the engine, every time, on any worker).
The pool resumes the requests of a dead worker on another one (cluster/resume.py); it must not
do so forever for a request that kills every worker it lands on, and it must never fail a
bystander of deaths it did not cause. What the pool sees of one death is only which requests
were running on that worker; a request that crashes its worker does so at a fixed point of its
sequence (its prompt's prefill, or the step that produces one given token), and a resumed
request starts from prompt + the tokens already sent, so a poison request dies again at the
start of every attempt, before producing a token there. The rule follows from that:

- An attempt is *proven* once it has produced a delta (a token) on its worker.
- A request whose worker died before its attempt there was proven becomes a *suspect*. (A
  request that had already produced tokens on the worker it lost is a bystander of that death:
  its next attempt starts after those tokens, where a deterministic crash would strike first.)
- A suspect's next attempt is a *trial*: it runs on a worker where no other suspect is on trial
  (the pool holds it until one is free), so that two suspects never share the blame for one
  death, and, for up to TRIAL_SETTLE_S, only on a worker where every attempt already running has
  produced its first delta: a freshly restarted worker busy prefilling a crowd of resumed
  requests would stretch the trial over seconds, and an unrelated death in that time would count
  against the suspect. The trial ends at its first token: the suspect is cleared and is a normal
  request again.
- A worker that dies during a suspect's trial is a *strike* against that suspect. At
  ``poison_strikes`` strikes in a row (PoolConfig, default 3; a token produced on any attempt
  clears them) the request fails as the suspected cause
  (SuspectedPoison -> INTERNAL), with the workers named. Nothing else fails a request for the
  deaths it saw: bystanders wait for a live worker, bounded by their deadline and
  ``PoolConfig.retry_patience_s``.

A poison request therefore costs at most 1 + ``poison_strikes`` worker deaths (the first one,
possibly shared with other fresh requests, then one per trial), or one more if its first attempt
had produced tokens before the crash. A bystander gets a strike only when an unrelated death
falls inside its trial, which lasts one engine step; ``poison_strikes`` such coincidences in a
row, with the request cleared by its first token after each, is what a false positive takes.
What the rule cannot see: a request that kills its worker only after producing tokens on every
attempt (a crash that depends on elapsed steps, not on the sequence) looks like a bystander; it
ends by its deadline or its client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRIAL_SETTLE_S = 10.0  # how long a trial waits for a settled worker before taking any free one


@dataclass
class Suspicion:
    """One request's record of the worker deaths it lived through (pure bookkeeping, no Ray)."""

    strikes_to_fail: int
    losses: int = 0  # workers that died while running this request
    strikes: int = 0  # deaths during its trials since it last produced a token
    suspect: bool = False
    lost_workers: list[str] = field(default_factory=list)  # worker ids, in order of death

    def __post_init__(self) -> None:
        if self.strikes_to_fail < 1:
            raise ValueError(f"strikes_to_fail must be >= 1, got {self.strikes_to_fail!r}")

    @property
    def on_trial(self) -> bool:
        """Whether the next attempt must run as a trial (alone among suspects on its worker)."""
        return self.suspect

    def proven(self) -> None:
        """The current attempt produced its first delta: whatever it was suspected of, it is
        cleared, and its strikes with it (they count trials in a row that ended in a death)."""
        self.suspect = False
        self.strikes = 0

    def lost(self, worker_id: str, *, proven: bool, trial: bool) -> bool:
        """The worker running the current attempt died. ``proven``: the attempt had produced a
        delta; ``trial``: it ran as a trial. Returns True when the request is now the suspected
        cause of the deaths and must fail."""
        self.losses += 1
        self.lost_workers.append(worker_id)
        if proven:
            return False
        if trial:
            self.strikes += 1
        self.suspect = True
        return self.strikes >= self.strikes_to_fail

    def describe(self, request_id: str) -> str:
        return (
            f"request {request_id!r} is the suspected cause of {self.losses} worker deaths: "
            f"{self.strikes} workers in a row died during its first step on them while no other "
            f"suspect ran there (workers lost: {', '.join(self.lost_workers)}); it is not retried"
        )
