"""The tuner: measure the candidates of a kernel call on this machine and remember the winner.

A call's **signature** is its kernel, dtype, platform, a bucket of its sizes (each
rounded up to a power of two) and the flags that change the algorithm (causal, a
mask or bias present, forward or forward+backward, ...). ``tune`` times every
candidate the kernel offers (``Kernel.tuning_candidates``: each implementation ×
its variants) interleaved, round after round within a time budget; clear losers
leave the race after each round, so the rounds go to the candidates that may still
win, and the one with the lowest median wins. Candidates within ``TIE`` of the
fastest count as tied and the table's order decides, so noise never moves auto off
the table for nothing. Candidates are compared round by round (the ratio of their
times in one round, whose calls run back to back), so a machine whose speed drifts
does not favour whichever candidate happened to run while it was fast.

Results live in one JSON file per machine fingerprint (``platform.fingerprint``)
under ``FASTLAYERS_CACHE_DIR`` (default ``~/.cache/fastlayers``): another machine,
TensorFlow version or thread count never reads them. Writes are atomic (a temporary
file, then ``os.replace``) and serialized by a lock file; each write re-reads the
file and merges, so two processes tuning at once lose nothing. A cache that cannot
be read or written gives one warning and auto keeps the table: nothing here raises
into a model.

``FASTLAYERS_AUTOTUNE=1`` tunes a signature the cache lacks on its first call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

import tensorflow as tf
from fastlayers.kernels import platform as platform_lib

CACHE_DIR_ENV = "FASTLAYERS_CACHE_DIR"
AUTOTUNE_ENV = "FASTLAYERS_AUTOTUNE"
BUDGET_ENV = "FASTLAYERS_TUNE_BUDGET"
FORMAT = 1

# Seconds one signature may take to tune, warm-ups (and compiles) included.
DEFAULT_BUDGET_SECONDS = 10.0
# Rounds of interleaved calls: at least MIN_ROUNDS even past the budget, so every
# candidate has a median, and no more than MAX_ROUNDS.
MIN_ROUNDS = 3
MAX_ROUNDS = 15
# Candidates whose median ratio to the fastest is within this fraction are tied: the
# first in the table's order wins. Wider than the spread of one kernel measured
# against itself in interleaved rounds on a shared machine (up to 4-5%), so that a
# tuned choice off the table is one that wins again when measured.
TIE = 0.05
# The table's choice (the first candidate) against a challenger, for its first
# OFF_TABLE_ROUNDS rounds: it leaves the race only once it lost every round by more
# than SPREAD (not TIE), and a challenger is chosen over it only by a median ratio
# past SPREAD. One kernel against itself spreads by 15-25% a call on a shared
# machine: in three rounds, one of three variants as fast as the table's often beats
# it by more than a tie every time, and such a choice then measures no faster.
OFF_TABLE_ROUNDS = 6
SPREAD = 0.25


def cache_dir() -> str:
    """``FASTLAYERS_CACHE_DIR``, else ``~/.cache/fastlayers``."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "fastlayers"
    )


def autotune_enabled() -> bool:
    """Whether ``FASTLAYERS_AUTOTUNE`` asks to tune new signatures on first call."""
    return os.environ.get(AUTOTUNE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def budget_seconds() -> float:
    """``FASTLAYERS_TUNE_BUDGET`` seconds per signature if set (and positive), else the default."""
    try:
        value = float(os.environ.get(BUDGET_ENV, ""))
    except ValueError:
        return DEFAULT_BUDGET_SECONDS
    return value if value > 0 else DEFAULT_BUDGET_SECONDS


@dataclasses.dataclass(frozen=True)
class Key:
    """A tuning signature: what a record was measured for."""

    kernel: str
    dtype: str
    platform: str
    flags: str  # canonical JSON of the flags
    bucket: tuple[int, ...]

    @property
    def family(self) -> tuple[str, str, str, str]:
        """Everything but the bucket: records of one family are matched by size."""
        return self.kernel, self.dtype, self.platform, self.flags

    def text(self) -> str:
        return json.dumps([*self.family, list(self.bucket)])


def make_key(kernel, tensors, options, *, platform: str, dtype) -> Key:
    """The ``Key`` of a call: the kernel's signature, and whether it runs forward only
    or forward and backward (a gradient tape records it)."""
    bucket, flags = kernel.signature(*tensors, **options)
    flags = dict(flags)
    flags["mode"] = "forward+backward" if platform_lib.gradient_recording() else "forward"
    return Key(
        kernel.name,
        tf.as_dtype(dtype).name,
        platform,
        json.dumps(flags, sort_keys=True, default=str),
        tuple(int(b) for b in bucket),
    )


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(x + 1) - math.log2(y + 1)) for x, y in zip(a, b, strict=True))


class Cache:
    """One machine's tuning records in ``<directory>/tuning-<fingerprint id>.json``.

    Args:
        directory: where the file lives (created on the first write).
        facts: the machine fingerprint (``platform.fingerprint()`` by default).
    """

    def __init__(self, directory: str, facts: dict | None = None):
        self.facts = platform_lib.fingerprint() if facts is None else facts
        self.directory = directory
        self.path = os.path.join(directory, f"tuning-{platform_lib.fingerprint_id(self.facts)}.json")
        self._records: dict[str, dict] | None = None
        self._families: dict[tuple, list[tuple[tuple[int, ...], dict]]] = {}
        self._kernels: set[str] = set()
        self._lookups: dict[Key, dict | None] = {}
        self._warned = False
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------

    def _warn(self, what: str, error: Exception) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"fastlayers could not {what} its tuning cache {self.path} ({error}); "
                "auto uses the shipped table for untuned calls. Set FASTLAYERS_CACHE_DIR "
                "to a writable directory, or delete the file to start it afresh.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _read_file(self) -> dict[str, dict]:
        """The records on disk; raises OSError or ValueError when unreadable or corrupt."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("records"), dict):
            raise ValueError("not a fastlayers tuning cache")
        if data.get("fingerprint") != self.facts:
            raise ValueError("its fingerprint is another machine's")
        return {k: v for k, v in data["records"].items() if isinstance(v, dict)}

    def records(self) -> dict[str, dict]:
        """Every record, by key text, read once per process (empty if unreadable)."""
        if self._records is None:
            with self._lock:
                if self._records is None:
                    try:
                        records = self._read_file()
                    except (OSError, ValueError) as error:
                        self._warn("read", error)
                        records = {}
                    self._index(records)
        return self._records

    def _index(self, records: dict[str, dict]) -> None:
        families: dict[tuple, list] = {}
        for text, record in records.items():
            try:
                kernel, dtype, platform, flags, bucket = json.loads(text)
                families.setdefault((kernel, dtype, platform, flags), []).append(
                    (tuple(bucket), record)
                )
            except (ValueError, TypeError):
                continue
        self._families = families
        self._kernels = {family[0] for family in families}
        self._lookups = {}
        self._records = records

    def kernels(self) -> set[str]:
        """The kernels with at least one record."""
        self.records()
        return self._kernels

    def lookup(self, key: Key, *, exact: bool = False) -> dict | None:
        """The record of ``key``, or of the nearest measured bucket of its family
        (``exact=False``); None if there is none."""
        self.records()
        found = self._lookups.get(key, False) if not exact else False
        if found is not False:
            return found
        family = self._families.get(key.family, [])
        same_rank = [(b, r) for b, r in family if len(b) == len(key.bucket)]
        if exact:
            return next((r for b, r in same_rank if b == key.bucket), None)
        found = None
        if same_rank:
            found = min(same_rank, key=lambda item: _distance(item[0], key.bucket))[1]
        self._lookups[key] = found
        return found

    # -- writing ------------------------------------------------------------------

    def store(self, key: Key, record: dict) -> bool:
        """Adds ``record`` under ``key`` and writes the file; False (one warning) if it
        cannot be written, in which case the record still serves this process."""
        records = dict(self.records())
        records[key.text()] = record
        try:
            os.makedirs(self.directory, exist_ok=True)
            with self._file_lock():
                try:
                    on_disk = self._read_file()
                except ValueError:  # corrupt: this write replaces it
                    on_disk = {}
                merged = {**on_disk, key.text(): record}
                self._write(merged)
            records = {**merged, **records}
            ok = True
        except OSError as error:
            self._warn("write", error)
            ok = False
        with self._lock:
            self._index(records)
        _GENERATION[0] += 1
        return ok

    @contextlib.contextmanager
    def _file_lock(self):
        import fcntl

        with open(self.path + ".lock", "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, records: dict[str, dict]) -> None:
        data = {"format": FORMAT, "fingerprint": self.facts, "records": records}
        fd, temporary = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


_CACHES: dict[str, Cache] = {}
_CACHES_LOCK = threading.Lock()
# Bumped whenever what a lookup could return changes (a record stored, the caches
# forgotten, the directory changed): callers memoize lookups under it.
_GENERATION = [0]


def generation() -> tuple[int, str, bool]:
    """A value that changes whenever a memoized lookup may be stale."""
    return _GENERATION[0], cache_dir(), autotune_enabled()


def cache() -> Cache:
    """The ``Cache`` of this machine under ``cache_dir()`` (one per directory per process)."""
    directory = cache_dir()
    found = _CACHES.get(directory)
    if found is None:
        with _CACHES_LOCK:
            found = _CACHES.get(directory)
            if found is None:
                found = _CACHES[directory] = Cache(directory)
    return found


def reset() -> None:
    """Forgets the caches read so far: the next lookup reads the files (and the
    fingerprint) again."""
    with _CACHES_LOCK:
        _CACHES.clear()
        _GENERATION[0] += 1


def choice_for(kernel, tensors, options, *, platform: str, dtype) -> tuple[str, dict | None] | None:
    """The tuned ``(implementation, variant data)`` of a call, or None.

    With ``FASTLAYERS_AUTOTUNE=1`` a signature without a record of its own is tuned
    now (inputs of the call's shapes; skipped when a shape is unknown when traced).
    """
    store = cache()
    autotune = autotune_enabled()
    if not autotune and kernel.name not in store.kernels():
        return None
    key = make_key(kernel, tensors, options, platform=platform, dtype=dtype)
    record = store.lookup(key, exact=autotune)
    if record is None and autotune:
        record = _autotune(kernel, tensors, options, key, platform=platform, dtype=dtype)
        if record is None:
            record = store.lookup(key)
    if record is None:
        return None
    implementation, variant = record.get("implementation"), record.get("variant")
    if not isinstance(implementation, str) or not (variant is None or isinstance(variant, dict)):
        return None
    return implementation, variant


def _autotune(kernel, tensors, options, key, *, platform, dtype):
    """Tunes a call's signature now; None if it cannot be (a shape unknown when
    traced, a tensor option of the trace) or the tuning failed (one warning)."""
    flat = [t for t in tf.nest.flatten(tensors) if isinstance(t, tf.Tensor)]
    if not all(t.shape.is_fully_defined() for t in flat) or any(
        isinstance(v, tf.Tensor) and tf.is_symbolic_tensor(v) for v in tf.nest.flatten(options)
    ):
        return None
    traced = any(tf.is_symbolic_tensor(t) for t in flat)
    try:
        with tf.init_scope():  # time eagerly, outside any function being traced
            inputs = sample_inputs(tensors) if traced else tensors
            backward = json.loads(key.flags).get("mode") == "forward+backward"
            return tune(kernel, inputs, options, platform=platform, dtype=dtype,
                        backward=backward, key=key)
    except Exception as error:  # noqa: BLE001 - tuning must never break a model's call
        if not _TUNING_FAILED:
            _TUNING_FAILED.append(kernel.name)
            warnings.warn(
                f"fastlayers could not tune a call of kernel {kernel.name!r} ({error}); "
                "auto uses the shipped table where it has no tuned choice.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None


# Kernels whose tuning raised: the first one warns, the rest of the process is quiet.
_TUNING_FAILED: list[str] = []


def sample_inputs(tensors):
    """Concrete tensors shaped as ``tensors``: normal floats, True masks, zero integers."""
    def sample(t):
        if not isinstance(t, tf.Tensor):
            return t
        shape = t.shape.as_list()
        if t.dtype.is_floating:
            return tf.cast(tf.random.normal(shape), t.dtype)
        if t.dtype == tf.bool:
            return tf.ones(shape, tf.bool)
        return tf.zeros(shape, t.dtype)

    return tf.nest.map_structure(sample, tensors)


def _runner(kernel, selection, tensors, options, backward: bool, in_function: bool) -> Callable[[], None]:
    floating = [
        t for t in tf.nest.flatten(tensors) if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]

    def forward():
        return kernel.run(selection, *tensors, **options)

    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(floating)
            outputs = forward()
            total = tf.add_n(
                [tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(outputs)]
            )
        return tape.gradient(total, floating)

    step = forward_backward if backward else forward
    return tf.function(step, autograph=False) if in_function else step


def round_order(count: int, round_index: int) -> list[int]:
    """The order of ``count`` interleaved candidates in round ``round_index``: a
    balanced Latin square (Williams'), in which every candidate runs right after every
    other equally often over ``count`` rounds (``2 * count`` when it is odd), as well
    as in every position. A candidate can slow the next one down (thread pools that
    spin after their work, caches it left cold); rotating one order would leave each
    candidate behind the same neighbour in every round."""
    base, low, high = [0], 1, count - 1
    while len(base) < count:
        base.append(low)
        low += 1
        if len(base) < count:
            base.append(high)
            high -= 1
    order = [(b + round_index) % count for b in base]
    return order[::-1] if count % 2 and (round_index // count) % 2 else order


def measure(candidates, run, *, budget: float, clock=time.perf_counter) -> dict[str, list[float]]:
    """Times ``run(candidate)`` for each candidate, interleaved, until ``budget`` seconds
    (warm-ups included) are spent.

    Candidates are warmed up (traced, compiled) in order while the budget lasts;
    those it does not reach are not timed (``_warm_up``: where implementations have
    variants, each default is timed once, an implementation whose default took more
    than ``1 + FIRST_ROUND_MARGIN`` times the fastest one's is left out, and only
    the variants of those within ``SCREEN_MARGIN`` of the fastest are tried). Then rounds: each times every candidate
    still in the race once, in a balanced order (``round_order``) so that no candidate
    always runs first or right after the same neighbour. After each round the clear losers leave the race (see
    ``_still_racing``), so the rounds that follow, and the round-by-round ratios that
    decide (``_ratio``), go to the candidates that may still win. Every racing candidate gets at least
    ``MIN_ROUNDS`` rounds and no more than ``MAX_ROUNDS``; the race ends early once
    it is decided (``_decided``).

    Returns each candidate's label → its timed seconds. A candidate that raises is
    dropped (it cannot serve the call).
    """
    start = clock()
    live, screened_out = _warm_up(candidates, run, start=start, budget=budget, clock=clock)
    times: dict[str, list[float]] = {c.label: [] for c in live}
    times.update(screened_out)
    racing = list(live)
    table = candidates[0].label if candidates else None
    for round_index in range(MAX_ROUNDS if racing else 0):
        round_start = clock()
        for candidate in [racing[i] for i in round_order(len(racing), round_index)]:
            before = clock()
            run(candidate)
            times[candidate.label].append(clock() - before)
        racing = _still_racing(racing, times, round_index + 1, table)
        if round_index + 1 >= MIN_ROUNDS and (
            _decided(racing, times) or clock() - start + (clock() - round_start) > budget
        ):
            break
    return times


# Where an implementation has variants (tiles), its default is warmed up and timed
# once first; the other variants are tried only for implementations whose default
# runs within this fraction of the fastest default. Tiles move an implementation by
# less than what separates attention's implementations at long sequences, and each
# variant costs a compile.
SCREEN_MARGIN = 0.5


def _warm_up(candidates, run, *, start, budget, clock):
    """The candidates that ran once (traced, compiled), in order, while the budget
    lasts (the first that runs always does), to race; a candidate that raises is left
    out. Also returns the screened-out defaults' labels → their one timed call."""

    def warmed(candidate) -> bool:
        try:
            run(candidate)
        except Exception:  # noqa: BLE001 - a failing candidate is simply not chosen
            return False
        return True

    defaults, seen = [], set()
    for candidate in candidates:
        if candidate.implementation not in seen:
            seen.add(candidate.implementation)
            defaults.append(candidate)
    variants = [c for c in candidates if not any(c is d for d in defaults)]
    live, screen = [], {}
    for candidate in defaults if variants else candidates:
        if live and clock() - start > budget:
            break  # the budget is spent: the later candidates in the table's order go untried
        if not warmed(candidate):
            continue
        live.append(candidate)
        if variants:
            before = clock()
            run(candidate)
            screen[candidate.implementation] = clock() - before
    fastest = min(screen.values(), default=math.inf)
    # An implementation whose default took more than the first round's margin over
    # the fastest would leave the race after round one: it leaves now, a call sooner,
    # with its screening time as its only one.
    slow = {
        c.label: [screen[c.implementation]]
        for c in live
        if screen.get(c.implementation, 0.0) > fastest * (1 + FIRST_ROUND_MARGIN)
    }
    live = [c for c in live if c.label not in slow]
    for candidate in variants:
        if clock() - start > budget:
            break
        if screen.get(candidate.implementation, math.inf) <= fastest * (1 + SCREEN_MARGIN) and warmed(candidate):
            live.append(candidate)
    return live, slow


# The machine's speed drifts (other work, frequency) over seconds, so a candidate is
# compared with another round by round: each round times every racing candidate
# once, close together, and the ratio of two candidates' times in one round cancels
# what the machine did to both. ``_ratio`` is the median of those ratios.
#
# After the first round a candidate leaves the race once it took more than
# ``1 + FIRST_ROUND_MARGIN`` times the leader's time (one call each, so only a wide
# margin is trusted); from the second round, once it lost every round to the leader
# by more than a tie.
FIRST_ROUND_MARGIN = 1.0


def _ratio(times, a, b) -> float:
    """The median, over the rounds both ran, of a's time over b's (labels)."""
    pairs = list(zip(times[a], times[b]))
    return statistics.median(x / y for x, y in pairs) if pairs else math.inf


def _leader(racing, times):
    """The candidate the others lose to by their median ratio (the first on a tie)."""
    anchor = racing[0].label
    return min(racing, key=lambda c: _ratio(times, c.label, anchor))


def _still_racing(racing, times, rounds: int, table=None):
    """The candidates that may still win after ``rounds`` rounds, in their order (the
    table's choice, label ``table``, by ``SPREAD`` before ``OFF_TABLE_ROUNDS``)."""
    leader = _leader(racing, times)

    def limit(candidate) -> float:
        if rounds == 1:
            return 1 + FIRST_ROUND_MARGIN
        return 1 + (SPREAD if candidate.label == table and rounds < OFF_TABLE_ROUNDS else TIE)

    def best_round(candidate) -> float:
        return min(x / y for x, y in zip(times[candidate.label], times[leader.label]))

    return [c for c in racing if c is leader or best_round(c) <= limit(c)]


def _decided(racing, times) -> bool:
    """Whether more rounds cannot change the choice: one candidate left, or every one
    left within ``TIE`` of the leader (tied: the table's order decides)."""
    leader = _leader(racing, times)
    return all(_ratio(times, c.label, leader.label) <= 1 + TIE for c in racing)


def choose(candidates, times: dict[str, list[float]]):
    """The leader among the candidates timed the most rounds (the race's finalists),
    by their round-by-round ratios; within ``TIE`` of it, the earliest in the table's
    order; before ``OFF_TABLE_ROUNDS`` rounds, the table's choice (the first
    candidate) unless it trails by more than ``SPREAD``. Returns it and every timed
    candidate's median seconds."""
    medians = {c.label: statistics.median(times[c.label]) for c in candidates if times.get(c.label)}
    if not medians:
        return None, medians
    rounds = max(len(times[label]) for label in medians)
    finalists = [c for c in candidates if c.label in medians and len(times[c.label]) == rounds]
    leader = _leader(finalists, times)
    table = candidates[0]
    if rounds < OFF_TABLE_ROUNDS and finalists[0] is table and _ratio(times, table.label, leader.label) <= 1 + SPREAD:
        return table, medians  # too few rounds to leave it for less than the spread
    for candidate in finalists:
        if _ratio(times, candidate.label, leader.label) <= 1 + TIE:
            return candidate, medians
    return None, medians


def tune(
    kernel,
    tensors,
    options,
    *,
    platform: str | None = None,
    dtype=None,
    backward: bool = False,
    in_function: bool = False,
    budget: float | None = None,
    clock=time.perf_counter,
    run: Callable | None = None,
    key: Key | None = None,
    store: Cache | None = None,
) -> dict | None:
    """Tunes one call and records the winner; returns its record (None if nothing ran).

    Args:
        kernel: a ``fastlayers.kernels.dispatch.Kernel`` (a declared kernel, a
            built-in one, or a ``CompiledLayer``'s).
        tensors: the call's tensor arguments (concrete tensors).
        options: the call's options.
        platform: the ``PLATFORMS`` entry; by default that of the first tensor.
        dtype: the dtype to select for; by default the first floating tensor's.
        backward: time forward and backward passes (a training step's use).
        in_function: time each candidate inside a ``tf.function`` (as a model's
            compiled step calls it) rather than called eagerly.
        budget: seconds for the whole measurement; ``budget_seconds()`` by default.
        clock: the timer, ``time.perf_counter`` by default (tests inject a fake).
        run: ``run(selection)`` runs one candidate once; by default the kernel call
            (with its gradient when ``backward``).
        key: the signature to record under; by default the call's own.
        store: the ``Cache`` to record in; by default ``cache()``.
    """
    flat = [t for t in tf.nest.flatten(tensors) if isinstance(t, tf.Tensor)]
    floating = [t for t in flat if t.dtype.is_floating]
    if dtype is None:
        dtype = floating[0].dtype if floating else tf.float32
    dtype = tf.as_dtype(dtype)
    if platform is None:
        platform = platform_lib.platform_of(flat[0] if flat else None)
    store = store or cache()
    shapes = tuple(None if not isinstance(t, tf.Tensor) else tuple(t.shape) for t in tensors)
    candidates = kernel.tuning_candidates(platform=platform, dtype=dtype, shapes=shapes, **options)
    if not candidates:
        return None
    table = kernel.table_selection(platform=platform, dtype=dtype, shapes=shapes, **options)
    if run is None:
        runners = {
            c.label: _runner(kernel, c, tensors, options, backward, in_function) for c in candidates
        }
        run = lambda candidate: runners[candidate.label]()  # noqa: E731
    times = measure(candidates, run, budget=budget_seconds() if budget is None else budget, clock=clock)
    winner, medians = choose(candidates, times)
    if winner is None:
        return None
    if key is None:
        mode = "forward+backward" if backward else "forward"
        bucket, flags = kernel.signature(*tensors, **options)
        key = Key(
            kernel.name,
            dtype.name,
            platform,
            json.dumps({**flags, "mode": mode}, sort_keys=True, default=str),
            tuple(int(b) for b in bucket),
        )
    work = kernel.work(*tensors, **options)
    record = {
        "kernel": kernel.name,
        "dtype": dtype.name,
        "implementation": winner.implementation,
        "variant": None if winner.variant is None else dataclasses.asdict(winner.variant),
        "label": winner.label,
        "table_choice": table.label,
        "seconds": medians,
        "rounds": max((len(v) for v in times.values()), default=0),
        "timed": ("forward+backward" if backward else "forward")
        + (" in a tf.function" if in_function else " eagerly"),
        "flops": work,
        "shapes": [list(s) if s is not None else None for s in shapes],
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    store.store(key, record)
    return record
