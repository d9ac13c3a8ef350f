"""Every Redis key and channel name redflow uses is built here, and nowhere else.

Layout: ``<prefix>:{<prefix>:<partition>}:<name>``. The braces make the prefix and the partition the
hash tag, so all keys of one partition live in one cluster slot (any script may touch any of them)
and two prefixes never share a slot. Keys still start with the prefix, so ACL key patterns and SCAN
by prefix keep working. Run ids end with their partition (``<ulid>-<partition>``), so a run's keys
are found from its id alone. A prefix has P partitions ``p0`` .. ``p<P-1>``, fixed when the prefix is
created and recorded in ``p0`` (``partitions``); a prefix created before that was recorded has one.

Per-run data lives in partition-wide hashes keyed by run id (``runs``, ``inputs`` …) rather than in
one key per run: scripts then only touch keys named in KEYS, never keys derived from ids.

Key (type) — contents — lifetime:
  version (string)        storage layout version                          permanent
  partitions (string)     the prefix's partition count P (in p0 only)     permanent
  runs (hash)             run id -> run header (MessagePack map)          until retention
  inputs (hash)           run id -> input JSON                            until retention
  results (hash)          run id -> output JSON (succeeded)               until retention
  errors (hash)           run id -> last error JSON                       until retention
  steps (hash)            <run id> -> line count, <run id>:<n> -> step record n (JSON line);
                          append-only (a wait's line is replaced by its resolution)  until retention
  attempts (hash)         <run id>:<attempt> -> how that attempt ended (JSON)  until retention
  leases (hash)           run id -> fencing token of the current attempt  while running
  index (zset, lex)       s:<status>:<id>, ws:<n>:<wf>:<status>:<id>       until retention
                          (<n> = length of the workflow name, so no name is a prefix of another);
                          every status but running: running runs are listed from `leases`
  running (hash)          workflow -> number of its runs running now      while any runs
  expiry (zset)           run id -> retention deadline (ms)               until retention
  workflows (hash)        workflow name -> metadata JSON                  permanent
  workers (zset)          worker id -> liveness deadline (ms)             until reaped
  owned:<wid> (set)       runs a worker holds (running, or failure hook)  until reaped
  leader (string)         "<wid>:<epoch>" of the elected leader           PX leader lease
  epoch, seq (string)     leader-epoch and fencing-token counters         permanent
  q:<queue>:ready (list)  runs to claim: LPUSH to enqueue, RPOP to claim  drained by workers
  q:<queue>:sched (zset)  run id -> due time (ms)                         until due
  q:<queue>:bell (list)   at most one token: wakes a worker blocked on it  popped by workers
  idem:<n>:<wf>:<key>     run id for an idempotency key (string)          EX idempotency TTL
  children (zset, lex)    <parent id>:<child id> for runs started by steps  until retention
  cascade (zset)          canceled run id -> time: its descendants are being canceled  until done
  waits (hash)            run id -> the durable wait it is suspended in    while waiting
  waiters (zset, lex)     <len>:<event>:<len>:<key>:<run id> event waits,  while waiting
                          c:<child id>:<parent id> parents waiting for a child
  events (hash)           event id -> event record (fan-out summary)      until retention
  event_data (hash)       event id -> {id, name, data, ts} JSON           until retention
  event_index (zset, lex) a:<ts>:<id>, n:<len>:<name>:<ts>:<id>           until retention
  event_expiry (zset)     event id -> retention deadline (ms)             until retention
  event_buffer (zset,lex) <len>:<event>:<len>:<key>:<ts>:<id>, newest 64 per key  until retention
  events_due (zset)       event id -> emit time of a delayed event        until delivered
  evidem:<n>:<ev>:<key>   event id for an event idempotency key (string)  EX idempotency TTL
  outbox (zset)           hand-offs to other partitions -> time: <index>:<event id> an event
                          recorded here that the waiters of partition <index> must see;
                          n<index>:<child id> a child to create there; c<index>:<child id> a
                          child that ended here, whose parent lives there  until applied
  outbox_data (hash)      n<index>:<child id> -> the child's creation record  until applied
  child_ends (hash)       child id -> "<status>\n<outcome JSON>" of a child of a run of this
                          partition that ended in another partition         until retention
  child_end_expiry (zset) child id -> when its child_ends entry is deleted   until retention
  inbox (zset)            event id -> when an event of another partition was applied here  a day
  event_copies (hash)     event id -> buffer member of an event of another partition,
                          copied here (its data in event_data)             until retention
  subscribers (hash)      <len>:<event>:<workflow> -> {workflow, queue, max_attempts}  permanent
  subscriber_index (zset) the same members, lexicographic                 permanent
  limits (hash)           workflow -> max_concurrency                     permanent (per definition)
  admission (hash)        workflow -> {throttle, rate_limit, mutex}      permanent (per definition)
  mutexes (hash)          <n>:<key>: -> run holding that mutex            while that run runs
  tb:<n>:<wf>:<key> (str) throttle window counter                         PX the window
  rb:<n>:<wf>:<key> (str) rate-limit window counter                       PX the window
  db:<n>:<wf>:<key> (str) the pending run of a debounce key               PX the debounce deadline
  stream:<run id> (stream) values a run streamed; an "end" entry when it ends  PX the retention window
  held (zset, lex)        runs waiting outside the ready lists, FIFO per group:  while held
                          c:<n>:<wf>:<seq>:<id> (max_concurrency), m:<n>:<mutex>:<seq>:<id>,
                          t:<n>:<throttle group>:<seq>:<id> (throttle queue)
  crons (hash)            trigger id -> cron trigger definition           permanent
  cron_last (hash)        trigger id -> last slot fired or skipped (ms)   permanent
  cron_version (string)   bumped when triggers change                     permanent
  registrations (hash)    worker id -> {workflows, at}: what each started worker defines  pruned at start
  cron_orphans (hash)     trigger id -> {workflow, since}: triggers no live worker serves  while orphaned
  bulk:<job id> (string)  progress of a bulk retry or cancel: its query, cursor and counts  EX 7 days
Channels: done:<run id> (a run reached a terminal status; payload = status, then a newline and the
output or error JSON when it is small); ctl:<worker id>
(cancellation requests for runs that worker holds; payload = run id).
"""

from __future__ import annotations

from ..errors import ConfigurationError

STORAGE_VERSION = "redflow-storage-5"
# The layout name of a prefix with several partitions: a redflow from before partitions refuses it.
PARTITIONED_VERSION = STORAGE_VERSION + "+partitions"
DEFAULT_PARTITION = "p0"
MAX_PARTITIONS = 256
CLUSTER_PARTITIONS = 16  # a new prefix's count on a cluster when none is configured (1 on one server)

# Where layout redflow-storage-3 (tag without the prefix) kept its version marker.
PREVIOUS_VERSION_KEY = "{prefix}:{{p0}}:version"

# Keys the 0.1.x reference layout creates at the top of its prefix; finding one means another layout.
FOREIGN_LAYOUT_MARKERS = ("workflows", "runs:created", "cron:next", "events:names", "cron:def")


def validate_prefix(prefix: str) -> str:
    if not prefix:
        raise ConfigurationError("the key prefix must not be empty")
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            f"the key prefix {prefix!r} must not contain '{{' or '}}': redflow adds its own hash tags"
        )
    return prefix


def partition_of(run_id: str) -> str:
    """The partition a run id names (the part after the last '-')."""
    _, sep, part = run_id.rpartition("-")
    if not sep or not part:
        raise ValueError(f"malformed run id {run_id!r}")
    return part


def partition_name(index: int) -> str:
    return f"p{index}"


def partition_index(run_id: str) -> int | None:
    """The index of the partition a run id names, or None when it names none (not a run id)."""
    _, sep, part = run_id.rpartition("-")
    if not sep or len(part) < 2 or part[0] != "p" or not part[1:].isdigit():
        return None
    return int(part[1:])


class PartitionKeys:
    """Key names of one partition under one prefix, computed once."""

    __slots__ = (
        "admission",
        "attempts",
        "base",
        "cascade",
        "child_end_expiry",
        "child_ends",
        "children",
        "cron_last",
        "cron_orphans",
        "cron_version",
        "crons",
        "epoch",
        "errors",
        "event_buffer",
        "event_copies",
        "event_data",
        "event_expiry",
        "event_index",
        "events",
        "events_due",
        "expiry",
        "held",
        "inbox",
        "index",
        "inputs",
        "leader",
        "leases",
        "limits",
        "mutexes",
        "outbox",
        "outbox_data",
        "partition",
        "partitions",
        "prefix",
        "registrations",
        "results",
        "running",
        "runs",
        "seq",
        "steps",
        "subscriber_index",
        "subscribers",
        "version",
        "waiters",
        "waits",
        "workers",
        "workflows",
    )

    def __init__(self, prefix: str, partition: str = DEFAULT_PARTITION) -> None:
        self.prefix = validate_prefix(prefix)
        self.partition = partition
        base = f"{prefix}:{{{prefix}:{partition}}}"
        self.base = base
        self.version = f"{base}:version"
        self.partitions = f"{base}:partitions"
        self.runs = f"{base}:runs"
        self.inputs = f"{base}:inputs"
        self.results = f"{base}:results"
        self.errors = f"{base}:errors"
        self.steps = f"{base}:steps"
        self.attempts = f"{base}:attempts"
        self.cascade = f"{base}:cascade"
        self.leases = f"{base}:leases"
        self.index = f"{base}:index"
        self.running = f"{base}:running"
        self.expiry = f"{base}:expiry"
        self.workflows = f"{base}:workflows"
        self.workers = f"{base}:workers"
        self.leader = f"{base}:leader"
        self.epoch = f"{base}:epoch"
        self.seq = f"{base}:seq"
        self.children = f"{base}:children"
        self.waits = f"{base}:waits"
        self.waiters = f"{base}:waiters"
        self.events = f"{base}:events"
        self.event_data = f"{base}:event_data"
        self.event_index = f"{base}:event_index"
        self.event_expiry = f"{base}:event_expiry"
        self.event_buffer = f"{base}:event_buffer"
        self.events_due = f"{base}:events_due"
        self.outbox = f"{base}:outbox"
        self.outbox_data = f"{base}:outbox_data"
        self.child_ends = f"{base}:child_ends"
        self.child_end_expiry = f"{base}:child_end_expiry"
        self.inbox = f"{base}:inbox"
        self.event_copies = f"{base}:event_copies"
        self.subscribers = f"{base}:subscribers"
        self.subscriber_index = f"{base}:subscriber_index"
        self.limits = f"{base}:limits"
        self.admission = f"{base}:admission"
        self.mutexes = f"{base}:mutexes"
        self.held = f"{base}:held"
        self.crons = f"{base}:crons"
        self.cron_last = f"{base}:cron_last"
        self.cron_version = f"{base}:cron_version"
        self.registrations = f"{base}:registrations"
        self.cron_orphans = f"{base}:cron_orphans"

    def owned(self, worker_id: str) -> str:
        return f"{self.base}:owned:{worker_id}"

    def ready(self, queue: str) -> str:
        return f"{self.base}:q:{queue}:ready"

    def scheduled(self, queue: str) -> str:
        return f"{self.base}:q:{queue}:sched"

    def bell(self, queue: str) -> str:
        return f"{self.base}:q:{queue}:bell"

    def idempotency(self, workflow: str, key: str) -> str:
        return f"{self.base}:idem:{len(workflow)}:{workflow}:{key}"

    def event_idempotency(self, event: str, key: str) -> str:
        return f"{self.base}:evidem:{len(event)}:{event}:{key}"

    def bulk_job(self, job_id: str) -> str:
        return f"{self.base}:bulk:{job_id}"

    def stream(self, run_id: str) -> str:
        return f"{self.base}:stream:{run_id}"

    def throttle(self, workflow: str, key: str) -> str:
        return f"{self.base}:tb:{tag(workflow)}{key}"

    def rate_limit(self, workflow: str, key: str) -> str:
        return f"{self.base}:rb:{tag(workflow)}{key}"

    def debounce(self, workflow: str, key: str) -> str:
        return f"{self.base}:db:{tag(workflow)}{key}"

    def control_channel_prefix(self) -> str:
        return f"{self.base}:ctl:"

    def control_channel(self, worker_id: str) -> bytes:
        return f"{self.base}:ctl:{worker_id}".encode()

    def done_channel(self, run_id: str) -> bytes:
        return f"{self.base}:done:{run_id}".encode()

    def done_channel_prefix(self) -> str:
        return f"{self.base}:done:"

    def foreign_markers(self) -> list[str]:
        return [f"{self.prefix}:{name}" for name in FOREIGN_LAYOUT_MARKERS]

    def previous_version(self) -> str:
        return PREVIOUS_VERSION_KEY.format(prefix=self.prefix)


def tag(value: str) -> str:
    """A length-prefixed member fragment, so one name can never read as a prefix of another.

    The length is in bytes, as Lua's string.len counts it.
    """
    return f"{len(value.encode())}:{value}:"


def event_member_prefix(event: str, correlation_key: str) -> str:
    """Member prefix of waiters and of the event buffer for (event name, correlation key)."""
    return tag(event) + tag(correlation_key)
