"""Follow mode: keep PostgreSQL in step with writes that reach Redis without memshift.

Like a binlog follower, ``follow`` needs no change to the application: it subscribes
to Redis keyspace notifications for the layout's keys (on every primary of a
cluster), collapses each session's burst of events into one re-read of the whole
session, and merges what it read with the backfill's monotonic merge
(:func:`memshift.migrate.bulk.merge_states`), so it converges with backfill, repair
and dual-writes in any order.

Notifications are at-most-once: those sent while the follower is down or
reconnecting are lost. So a **sweeper** reads every session on a schedule (and at
once after a start or a reconnect), and re-applies those that changed since the
follower last applied them: each applied session leaves a digest of the Redis replies
it was read from in ``memshift.follow_sessions``, so an unchanged session costs a read
and a comparison, not a merge. (The layout's ``updated_at``/``version`` would be a
cheaper test, but neither the reference layout's own appends nor a legacy LTRIM move
them, so a sweep that trusted them would miss messages.)

The follower's **position** (``memshift.followers.applied_through``): every change
Redis made before it is in PostgreSQL. It is the time of the oldest change notified
and not yet applied, held back while a catch-up sweep is due; lag is now minus it.
A killed follower's position stays where it died, so ``memshift follow --status``
and the Plan's gates see the lag grow until a restarted follower has swept.

A session gone from Redis (deleted, expired or evicted) is never deleted from
PostgreSQL: once a second read confirms it gone, its expiry is recorded and a status
that may move to ``expired`` does (``follow_mark_gone`` in ``queries.sql``).

The parts, a module each: ``notifications`` (the flags a layout needs, which session
a key belongs to, the listener threads), ``applier`` (re-read, compare digests,
merge; record sessions gone), ``sweeper``, ``position`` (the pending changes that
hold the position back, the status, the followers' rows) and ``follower``
(``follow``: its threads started, run and stopped).
"""

from memshift.migrate.follow.applier import Applied, digest
from memshift.migrate.follow.follower import FollowerBusy, FollowOptions, FollowRefused, follow
from memshift.migrate.follow.notifications import (
    KeyMap,
    NotificationsOff,
    ensure_notifications,
    missing_flags,
    required_flags,
    with_flags,
)
from memshift.migrate.follow.position import FollowerRow, FollowStatus, followers

__all__ = [
    "Applied",
    "FollowOptions",
    "FollowRefused",
    "FollowStatus",
    "FollowerBusy",
    "FollowerRow",
    "KeyMap",
    "NotificationsOff",
    "digest",
    "ensure_notifications",
    "follow",
    "followers",
    "missing_flags",
    "required_flags",
    "with_flags",
]
