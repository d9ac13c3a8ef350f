"""Reads through the run index and the per-run hashes: pages of run ids, the records a listing shows,
counts, backlogs, and the development-only prefix reset. The index's member encoding lives here."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Sequence
from itertools import islice

from .._redis.client import RedisClient
from ..ids import _b32
from .keys import PartitionKeys, tag
from .records import RunHeader, decode_header

STATUSES = ("scheduled", "queued", "running", "succeeded", "failed", "canceled")


RUNNING_PREFIX = b"s:running:"
RUNNING_SCAN = 1000  # lease holders read per command while listing running runs


def index_prefixes(status: str | None, workflow: str | None) -> list[bytes]:
    """Member prefixes of the index entries of runs with that status and/or workflow; several (one
    per status) when no status is given, merged by the caller. A run has two members, s:<status>:<id>
    and ws:<workflow>:<status>:<id>: a workflow's runs are listed from the second. Running runs have
    no members (they are counted per workflow instead); their prefixes, s:running: and
    ws:<workflow>:running:, are served by ``RunIndex.page`` from the lease holders."""
    if status and workflow:
        return [f"ws:{tag(workflow)}{status}:".encode()]
    if status:
        return [f"s:{status}:".encode()]
    if workflow:
        return [f"ws:{tag(workflow)}{s}:".encode() for s in STATUSES]
    return [f"s:{s}:".encode() for s in STATUSES]


PageSource = Callable[[str | None, int], Awaitable[list[str]]]
"""Reads up to a count of ids past a cursor id from one id-ordered source."""


async def merge_pages(sources: Sequence[PageSource], cursor: str | None, limit: int, descending: bool) -> list[str]:
    """The first ``limit`` ids past ``cursor`` over several sources, each in id order. A source is
    read a share of the page at first, then again only while the last id read from it is inside
    the page (its unread ids could still belong there), and only for as many ids as follow that id
    in the page: a page reads about ``limit`` ids, however many sources there are or ids they hold."""
    if len(sources) == 1:
        return await sources[0](cursor, limit)
    read: list[list[str]] = [[] for _ in sources]
    ended = [False] * len(sources)
    asks = {i: min(limit, 2 * -(-limit // len(sources))) for i in range(len(sources))}
    while True:
        replies = await asyncio.gather(*(sources[i](read[i][-1] if read[i] else cursor, n) for i, n in asks.items()))
        for (i, n), ids in zip(asks.items(), replies, strict=True):
            read[i].extend(ids)
            ended[i] = len(ids) < n
        page = list(islice(heapq.merge(*read, reverse=descending), limit))
        rank = {run_id: pos for pos, run_id in enumerate(page)}
        asks = {}
        for i, ids in enumerate(read):
            if ended[i]:
                continue
            pos = rank.get(ids[-1])
            # A source that did not end has its last id in the page whenever the page is short.
            if pos is not None and pos < limit - 1:
                asks[i] = limit - 1 - pos  # the ids after this one in the page are all it could displace
        if not asks:
            return page


def children_prefix(parent_run_id: str) -> bytes:
    """Member prefix of a parent's entries in the ``children`` index."""
    return f"{parent_run_id}:".encode()


def running_filter(prefix: bytes) -> str | None:
    """For a running prefix of ``index_prefixes``: the workflow it lists ('' for every workflow);
    None for any other prefix."""
    if prefix == RUNNING_PREFIX:
        return ""
    if not prefix.startswith(b"ws:") or not prefix.endswith(b":running:"):
        return None
    size, _, rest = prefix[3:].partition(b":")
    if not size.isdigit() or rest[int(size):] != b":running:":
        return None
    return rest[: int(size)].decode()


def untag(field: str) -> str:
    """The value inside a length-prefixed member fragment ``<len>:<value>:`` (see keys.tag)."""
    size, _, rest = field.partition(":")
    return rest[: int(size)] if size.isdigit() else field


class RunIndex:
    def __init__(self, redis: RedisClient, keys: PartitionKeys) -> None:
        self.redis = redis
        self.keys = keys

    async def page(
        self, prefix: bytes, cursor: str | None, limit: int, descending: bool,
        created_after: int | None = None, created_before: int | None = None, *, children: bool = False,
    ) -> list[str]:
        """Up to ``limit`` run ids under one member prefix of the index (or of ``children``), past the
        id ``cursor``, oldest first or newest first."""
        workflow = None if children else running_filter(prefix)
        if workflow is not None:
            return await self._running_page(workflow, cursor, limit, descending, created_after, created_before)
        # Bounds as (member, inclusive). Ids start with their creation time, so a time range is a
        # member range; the cursor (an id) tightens the bound on the side the page moves away from.
        lo: tuple[bytes, bool] = (prefix + (_b32(created_after, 10).encode() if created_after else b""), True)
        hi: tuple[bytes, bool] = (
            (prefix + _b32(created_before, 10).encode(), False) if created_before else (prefix + b"\xff", True)
        )
        if cursor is not None:
            mark = prefix + cursor.encode()
            if descending and mark <= hi[0]:
                hi = (mark, False)
            elif not descending and mark >= lo[0]:
                lo = (mark, False)
        lo_arg = (b"[" if lo[1] else b"(") + lo[0]
        hi_arg = (b"[" if hi[1] else b"(") + hi[0]
        key = self.keys.children if children else self.keys.index
        if descending:
            members = await self.redis.execute("ZREVRANGEBYLEX", key, hi_arg, lo_arg, "LIMIT", 0, limit)
        else:
            members = await self.redis.execute("ZRANGEBYLEX", key, lo_arg, hi_arg, "LIMIT", 0, limit)
        return [m[len(prefix):].decode() for m in members]

    async def _running_page(
        self, workflow: str, cursor: str | None, limit: int, descending: bool,
        created_after: int | None, created_before: int | None,
    ) -> list[str]:
        """``page`` for running runs: the lease holders whose header says running (a lease is also
        held by a queued run claimed for admission and by a failed run whose on_failure hook runs),
        in id order. Costs the number of runs in flight, not the number of runs kept."""
        lo = _b32(created_after, 10) if created_after else ""
        hi = _b32(created_before, 10) if created_before else None
        ids = sorted(
            run_id for raw in await self.redis.execute("HKEYS", self.keys.leases)
            if (run_id := raw.decode()) >= lo and (hi is None or run_id < hi)
            and (cursor is None or (run_id < cursor if descending else run_id > cursor))
        )
        if descending:
            ids.reverse()
        out: list[str] = []
        for start in range(0, len(ids), RUNNING_SCAN):
            chunk = ids[start:start + RUNNING_SCAN]
            for run_id, raw in zip(chunk, await self.redis.execute("HMGET", self.keys.runs, *chunk), strict=True):
                if raw is None:
                    continue
                h = decode_header(raw)
                if h.status == "running" and (not workflow or h.workflow == workflow):
                    out.append(run_id)
                    if len(out) == limit:
                        return out
        return out

    async def merged_page(
        self, prefixes: list[bytes], cursor: str | None, limit: int, descending: bool,
        created_after: int | None = None, created_before: int | None = None, *, children: bool = False,
    ) -> list[str]:
        """``page`` over several prefixes of this partition, merged in id order. Each prefix is read
        for the whole page, all in one round trip (the commands are pipelined): a second round, as
        ``merge_pages`` would take when the statuses are unevenly filled, costs more than the ids."""
        pages = await asyncio.gather(*(
            self.page(p, cursor, limit, descending, created_after, created_before, children=children)
            for p in prefixes
        ))
        if len(pages) == 1:
            return pages[0]
        return list(islice(heapq.merge(*pages, reverse=descending), limit))

    async def headers_and_errors(self, ids: list[str]) -> list[tuple[RunHeader | None, bytes | None]]:
        k = self.keys
        headers, errors = await asyncio.gather(
            self.redis.execute("HMGET", k.runs, *ids), self.redis.execute("HMGET", k.errors, *ids)
        )
        return [(None if raw is None else decode_header(raw), err) for raw, err in zip(headers, errors, strict=True)]

    async def blobs(self, ids: list[str]) -> dict[str, tuple[bytes | None, ...]]:
        """Input, output and error of each run, in three commands for all of them."""
        k, redis = self.keys, self.redis
        inputs, outputs, errors = await asyncio.gather(
            redis.execute("HMGET", k.inputs, *ids), redis.execute("HMGET", k.results, *ids),
            redis.execute("HMGET", k.errors, *ids),
        )
        return {run_id: (inp, out, err) for run_id, inp, out, err in zip(ids, inputs, outputs, errors, strict=True)}

    async def workflow_names(self) -> list[str]:
        return sorted(n.decode() for n in await self.redis.execute("HKEYS", self.keys.workflows))

    async def workflow_metas(self) -> list[bytes]:
        flat = await self.redis.execute("HGETALL", self.keys.workflows)
        return [flat[i + 1] for i in range(0, len(flat), 2)]

    async def status_counts(self) -> dict[str, int]:
        k = self.keys
        counted = [s for s in STATUSES if s != "running"]
        running, *counts = await asyncio.gather(
            self.redis.execute("HVALS", k.running),
            *(self.redis.execute("ZLEXCOUNT", k.index, f"[s:{s}:".encode(), f"[s:{s}:".encode() + b"\xff")
              for s in counted),
        )
        by_status = {s: int(c) for s, c in zip(counted, counts, strict=True)}
        by_status["running"] = sum(int(n) for n in running)
        return {s: by_status[s] for s in STATUSES}

    async def queue_sizes(self, queues: list[str]) -> dict[str, dict[str, int]]:
        """Each queue's ready (claimable now) and scheduled (due later) counts."""
        k = self.keys
        redis = self.redis
        sizes = await asyncio.gather(*(
            c for q in queues for c in (redis.execute("LLEN", k.ready(q)), redis.execute("ZCARD", k.scheduled(q)))
        ))
        return {q: {"ready": int(sizes[2 * i]), "scheduled": int(sizes[2 * i + 1])} for i, q in enumerate(queues)}

    async def next_ready(self, queue: str) -> str | None:
        """The run id the next claim of ``queue`` takes."""
        oldest: bytes | None = await self.redis.execute("LINDEX", self.keys.ready(queue), -1)
        return None if oldest is None else oldest.decode()

    async def delete_prefix(self, keep: set[str]) -> int:
        """Development only: delete every key of this prefix but ``keep`` (scans the keyspace)."""
        deleted = 0
        # Only this prefix's partitions, not longer prefixes. SCAN MATCH is a glob: the prefix's glob
        # characters are escaped so it matches itself only (PartitionKeys refuses braces in it).
        literal = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.keys.prefix)
        pattern = f"{literal}:{{*"
        for node in await self.redis.masters():
            cursor = b"0"
            while True:
                cursor, keys = await node.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                doomed = [key for key in keys if key.decode() not in keep]
                # One key per UNLINK: on a cluster one call may not span slots.
                deleted += sum(map(int, await asyncio.gather(*(node.execute("UNLINK", key) for key in doomed))))
                if cursor == b"0":
                    break
        return deleted
