"""Session affinity for the engine replicas: one document's requests go to the replica holding its KV cache.

A Ray Serve custom request router (``ray.serve.request_router.RequestRouter``, configured with
``RequestRouterConfig``). The ingress passes the client's ``x-session-id`` header as the
``session_id`` keyword of each call; the router ranks the live replicas by rendezvous hashing
(highest random weight: ``hash(session, replica)``, a consistent hash: when a replica joins or
leaves, only the sessions that hashed to it move). The first rank is the session's own replica,
the second the others by load, so a full replica (``max_ongoing_requests``) or one that is
``imbalance`` requests busier than the least loaded spills over, and a dead one's sessions move to
their next replica. A request without a session id goes to the least loaded replica.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

DEFAULT_IMBALANCE = 4


def session_of(pending: PendingRequest | None) -> str | None:
    """The ``session_id`` keyword the ingress calls the replica with (None: no affinity)."""
    if pending is None:
        return None
    value = pending.kwargs.get("session_id")
    return value if isinstance(value, str) and value else None


def weight(session: str, replica: str) -> int:
    """Rendezvous weight of a (session, replica) pair: stable across processes (not Python's hash)."""
    return int.from_bytes(hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest(), "big")


def rank_for(session: str, replicas: list[str]) -> list[str]:
    """Replica ids, the session's own first (highest weight), then its fallbacks in order."""
    return sorted(replicas, key=lambda r: weight(session, r), reverse=True)


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    """Consistent hashing on the session id, with a load fallback."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs: Any) -> None:
        self.imbalance = imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        load = {rid: self._queue_len(r) for rid, r in by_id.items()}
        by_load = sorted(by_id, key=lambda rid: load[rid])
        session = session_of(pending_request)
        if session is None:
            return [[by_id[rid] for rid in by_load]]
        order = rank_for(session, list(by_id))
        own = order[0]
        if load[own] - load[by_load[0]] >= self.imbalance:  # too busy: the least loaded takes this one
            return [[by_id[by_load[0]]], [by_id[rid] for rid in order]]
        return [[by_id[own]], [by_id[rid] for rid in by_load if rid != own]]

    def _queue_len(self, replica: RunningReplica) -> int:
        """Ongoing requests as the router last heard (0 when unknown: the probe fills it in)."""
        value = self.replica_queue_len_cache.get(replica.replica_id)
        return int(value) if value is not None else 0
