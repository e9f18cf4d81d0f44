"""Fault injection at named points: make a process die exactly inside a crash window.

Why: the delivery promises hold only if every crash window is survivable. A chaos run
SIGKILLs processes at random and may or may not land in the window that matters; a
test that arms one of these points lands in it every time, and then asserts that the
recovery path meant for that window is the one that acted.

Test only. ``FAULT_POINT=name:action`` is read once, when this module is imported;
unset (always, outside tests) :func:`hit` is one comparison and returns. Actions:

- ``exit``: print ``FAULT_POINT name: exit 137`` on stderr and ``os._exit(137)``, the
  exit status of a SIGKILL: no ``finally``, no ack, no goodbye to Redis;
- ``raise``: raise :class:`FaultInjected` the first time the point is reached (once
  per process), so the caller's own error handling runs.

An unknown name or action is bad configuration: one line on stderr, exit 2.

The points: where each sits (what the process has just done) -> the recovery that must act.

- ``worker.after_take``: the take's Lua call moved a batch into the worker's processing
  list; none of it handled -> the reaper returns the whole batch once the heartbeat
  expires.
- ``worker.after_commit``: a handler committed its effect and stored outcome; nothing
  emitted -> the reaper returns the message; the redelivery finds the stored outcome
  (the event-id check) and emits it; the effect does not happen twice.
- ``worker.after_emit``: the outcome event is published, the message not acked -> the
  reaper; the redelivery re-emits the same event id, which the recorder drops.
- ``worker.before_ack``: the whole batch handled and emitted, its one ack call not sent
  -> the reaper returns the batch; each message as for ``worker.after_emit``.
- ``email.after_send``: the SMTP server took an email, its "sent" row not yet
  committed (the one window SMTP leaves open) -> the claim's lease runs out and the
  redelivery sends that email again, with the same Message-ID; a batch's other emails,
  claimed but not sent, go out once.
- ``api.after_commit``: POST /orders committed the order and its outbox row (born
  claimed), before the fast-path publish -> a relay publishes the row once its claim
  has expired; the client's retry with its Idempotency-Key finds the order.
- ``api.group_commit``: POST /orders's group commit inserted the orders of several
  concurrent requests in one transaction, not committed (reached only by batches of
  two or more) -> the transaction dies with the process: none of those orders is
  stored and none was answered; each client's retry with its Idempotency-Key stores
  its order once.
- ``api.before_publish``: POST /orders committed and handed its event to the worker's
  background publisher (the 201 may be on its way), which is about to send it -> as
  for ``api.after_commit``: the relay publishes the claimed row once the claim expires.
- ``relay.after_publish``: a relay published a claimed batch, did not mark it -> the
  claims expire and a relay publishes the rows again: duplicates with the same event
  ids, which consumers drop; never a loss.

tests/integration/test_fault_points.py arms each point in a real process.
"""

from __future__ import annotations

import os
import sys
import threading

from messaging.config import env_str

ENV = "FAULT_POINT"
"""The environment variable that arms one point: ``name:action`` (declared in
:data:`messaging.config.ENV_VARS`, so the README's table lists it)."""
EXIT_STATUS = 137
"""What ``exit`` returns: 128 + SIGKILL, as if the process had been killed."""
POINTS = frozenset(
    {
        "worker.after_take",
        "worker.after_commit",
        "worker.after_emit",
        "worker.before_ack",
        "email.after_send",
        "api.after_commit",
        "api.group_commit",
        "api.before_publish",
        "relay.after_publish",
    }
)
"""Every named point; each has exactly one :func:`hit` call in the code."""
ACTIONS = frozenset({"exit", "raise"})


class FaultInjected(RuntimeError):
    """Raised by an armed point whose action is ``raise``."""


def parse(value: str) -> tuple[str, str] | None:
    """``name:action`` -> (name, action); '' -> None. Raises ValueError naming the problem."""
    if not value:
        return None
    name, _, action = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"unknown point {name!r}: must be one of {', '.join(sorted(POINTS))}")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: must be exit or raise")
    return name, action


try:
    _ARMED = parse(env_str(os.environ, ENV))
except ValueError as _exc:
    print(f"{ENV}: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None
_fired = False
_lock = threading.Lock()


def hit(name: str) -> None:
    """Mark the point ``name``: die or raise here when FAULT_POINT arms it, else nothing."""
    if _ARMED is None or _ARMED[0] != name:
        return
    if _ARMED[1] == "exit":
        print(f"{ENV} {name}: exit {EXIT_STATUS}", file=sys.stderr, flush=True)
        os._exit(EXIT_STATUS)
    global _fired
    with _lock:
        if _fired:
            return
        _fired = True
    print(f"{ENV} {name}: raise", file=sys.stderr, flush=True)
    raise FaultInjected(f"fault injected at {name}")
