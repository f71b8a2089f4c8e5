"""The tuner and its per-machine cache: choice logic on a fake clock, the cache file's
round trip and failures, concurrent writers, fingerprints, and FASTLAYERS_AUTOTUNE."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import tensorflow as tf

from fastlayers.kernels import dispatch, platform, tuning


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache directory and reads it afresh."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(directory))
    monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
    tuning.reset()
    yield directory
    tuning.reset()


def _double(x):
    return 2 * x


def _kernel(name="tuned_double", refuse=None, **kwargs):
    def reasons(implementation, *, platform, dtype, refuse_xla=False):
        return ["refused by the test"] if implementation == "xla" and refuse_xla else []

    return dispatch.Kernel(
        name,
        _double,
        auto={(dispatch.cpu_platform(), "*"): ("graph", "xla", "reference")},
        not_supported_reasons=reasons,
        **kwargs,
    )


class FakeClock:
    """Time moves only when a candidate runs: by its cost in seconds, or by the next
    of its list of costs (cycled; the first is its warm-up's)."""

    def __init__(self, costs):
        self.now = 0.0
        self.costs = costs
        self.calls = {label: 0 for label in costs}

    def __call__(self):
        return self.now

    def run(self, candidate):
        cost = self.costs[candidate.label]
        if isinstance(cost, list):
            cost = cost[self.calls[candidate.label] % len(cost)]
        self.calls[candidate.label] += 1
        self.now += cost


# Three candidates whose timings overlap (noise): in each of the first rounds every
# one wins or ties, so none leaves the race, and none ties the leader on its median
# ratio to it (xla; graph's ratio is 1.1 in two rounds of four, reference's 1.2).
NOISY = {"graph": [0.9, 1.1, 0.95, 1.1], "xla": [1.25, 1.0, 1.0, 1.0], "reference": [1.0, 1.2, 1.0, 1.2]}


def _tune(kernel, clock, budget=100.0, x=None, **options):
    x = tf.ones([4, 4]) if x is None else x
    return tuning.tune(kernel, (x,), options, budget=budget, clock=clock, run=clock.run)


def test_the_fastest_candidate_wins_and_a_slow_one_never_does():
    clock = FakeClock({"graph": 3.0, "xla": 1.0, "reference": 50.0})
    record = _tune(_kernel(), clock)
    assert record["implementation"] == "xla"
    assert record["table_choice"] == "graph"
    assert record["seconds"] == {"graph": 3.0, "xla": 1.0, "reference": 50.0}


def test_clear_losers_leave_the_race_and_the_finalists_get_the_rounds():
    clock = FakeClock({"graph": 1.3, "xla": 1.0, "reference": 50.0})
    record = _tune(_kernel(), clock, budget=30.0)
    # a warm-up each; reference is over twice the leader in the first round, graph
    # over a quarter slower from the second: xla alone is left after its MIN_ROUNDS
    assert clock.calls == {"reference": 2, "graph": 3, "xla": 1 + tuning.MIN_ROUNDS}
    assert record["implementation"] == "xla" and record["rounds"] == tuning.MIN_ROUNDS
    assert record["seconds"] == pytest.approx({"graph": 1.3, "xla": 1.0, "reference": 50.0})


def test_candidates_whose_timings_overlap_race_until_the_budget():
    clock = FakeClock(NOISY)
    record = _tune(_kernel(), clock, budget=1e9)
    assert clock.calls == {label: 1 + tuning.MAX_ROUNDS for label in clock.costs}
    assert record["implementation"] == "xla"


def test_a_candidate_slower_on_every_call_than_the_leader_leaves_after_two_rounds():
    clock = FakeClock({"graph": 1.08, "xla": 1.0, "reference": [1.1, 0.95, 1.3]})
    record = _tune(_kernel(), clock, budget=1e9)
    # graph, the table's choice, is 8% slower every time: within the spread of a
    # kernel against itself, so it races OFF_TABLE_ROUNDS rounds, then is out (it lost
    # them all by more than a tie); reference wins a round in three, so it races on,
    # and loses on its median ratio to xla (1.1)
    assert clock.calls["graph"] == 1 + tuning.OFF_TABLE_ROUNDS
    assert record["implementation"] == "xla"


def test_a_challenger_ahead_by_less_than_the_spread_needs_more_rounds_to_be_chosen():
    # xla leads graph, the table's choice, by 10-12% in each of three rounds, and the
    # budget ends the race there: too few rounds to leave the table for that.
    clock = FakeClock({"graph": 1.1, "xla": [1.0, 1.0, 0.98], "reference": 50.0})
    record = _tune(_kernel(), clock, budget=10.0)
    assert record["rounds"] == tuning.MIN_ROUNDS < tuning.OFF_TABLE_ROUNDS
    assert record["implementation"] == "graph"
    # With the rounds to show it, the same lead wins.
    clock = FakeClock({"graph": 1.1, "xla": [1.0, 1.0, 0.98], "reference": 50.0})
    record = _tune(_kernel("tuned_double_again"), clock, budget=1e9)
    assert record["rounds"] >= tuning.OFF_TABLE_ROUNDS and record["implementation"] == "xla"


def test_rounds_rotate_the_order_the_candidates_run_in():
    order = []
    clock = FakeClock({"graph": 1.0, "xla": 1.0, "reference": 1.0})

    def run(candidate):
        order.append(candidate.label)
        clock.run(candidate)

    tuning.tune(_kernel(), (tf.ones([2]),), {}, budget=12.0, clock=clock, run=run)
    rounds = [order[i:i + 3] for i in range(3, len(order), 3)]
    assert rounds[:3] == [
        ["graph", "xla", "reference"], ["xla", "reference", "graph"], ["reference", "graph", "xla"]
    ]


@pytest.mark.parametrize("count", range(1, 8))
def test_round_orders_balance_positions_and_neighbours(count):
    rounds = count * (2 if count % 2 else 1)
    orders = [tuning.round_order(count, r) for r in range(rounds)]
    assert all(sorted(order) == list(range(count)) for order in orders)
    positions = {(order[p], p) for order in orders for p in range(count)}
    assert len(positions) == count * count  # each candidate in every position
    follows = [(order[p], order[p + 1]) for order in orders for p in range(count - 1)]
    # each candidate right after each other equally often
    assert len(set(follows)) == count * (count - 1)
    assert all(follows.count(pair) == follows.count(follows[0]) for pair in follows)


def test_a_noisy_first_round_does_not_decide_alone():
    # graph's first timed call is slow (noise), its later ones the fastest: it stays
    # in the race (within twice the leader) and wins on its median ratio
    clock = FakeClock({"graph": [1.0, 1.9] + [0.8] * 20, "xla": 1.0, "reference": 1.0})
    record = tuning.tune(_kernel(), (tf.ones([2]),), {}, budget=1e9, clock=clock, run=clock.run)
    assert record["implementation"] == "graph"


class DriftingClock(FakeClock):
    """A machine whose speed drifts: call n costs factors[n % len(factors)] times the
    candidate's cost, whichever candidate it is."""

    def __init__(self, costs, factors):
        super().__init__(costs)
        self.factors = factors
        self.count = 0

    def run(self, candidate):
        self.now += self.factors[self.count % len(self.factors)] * self.costs[candidate.label]
        self.count += 1


def test_a_drifting_machine_does_not_pick_the_candidate_it_was_fast_for():
    # graph is the fastest (0.9 against xla's 1.0); the machine is twice as slow for
    # three calls of every five, which fall on graph's calls more often than on xla's
    # (medians of raw times pick xla); the ratios of calls in one round pick graph
    clock = DriftingClock({"graph": 0.9, "xla": 1.0, "reference": 1.2}, [2.0, 1.0, 1.0, 2.0, 2.0])
    record = tuning.tune(_kernel(), (tf.ones([2]),), {}, budget=1e9, clock=clock, run=clock.run)
    assert record["implementation"] == "graph"


def test_ties_go_to_the_tables_order():
    clock = FakeClock({"graph": 1.0, "xla": 1.0 - tuning.TIE / 2, "reference": 1.0})
    assert _tune(_kernel(), clock)["implementation"] == "graph"
    clock = FakeClock({"graph": 1.0, "xla": 0.9, "reference": 0.9})
    assert _tune(_kernel("tuned_double_2"), clock)["implementation"] == "xla"


def test_the_budget_is_respected():
    clock = FakeClock(NOISY)
    record = _tune(_kernel(), clock, budget=20.0)
    # warm-ups (3.15 s), then whole rounds (2.95-3.3 s) while the next one still fits
    assert 20.0 - 3.3 < clock.now <= 20.0
    assert record["rounds"] == 5
    clock = FakeClock(NOISY)
    record = _tune(_kernel(), clock, budget=0.5)
    assert record["rounds"] == tuning.MIN_ROUNDS  # medians need a few rounds whatever the budget
    clock = FakeClock(NOISY)
    assert _tune(_kernel(), clock, budget=1e9)["rounds"] == tuning.MAX_ROUNDS


def test_tied_candidates_end_the_race_after_its_first_rounds():
    clock = FakeClock({"graph": 1.0, "xla": 1.0 - tuning.TIE / 2, "reference": 1.0 + tuning.TIE / 2})
    record = _tune(_kernel(), clock, budget=1e9)
    assert record["rounds"] == tuning.MIN_ROUNDS and record["implementation"] == "graph"


def test_a_candidate_that_fails_is_dropped():
    clock = FakeClock({"graph": 1.0, "xla": 0.5, "reference": 2.0})

    def run(candidate):
        if candidate.implementation == "xla":
            raise RuntimeError("cannot compile")
        clock.run(candidate)

    record = tuning.tune(_kernel(), (tf.ones([2]),), {}, budget=10.0, clock=clock, run=run)
    assert record["implementation"] == "graph" and "xla" not in record["seconds"]


def test_the_cache_round_trips_and_matches_the_nearest_bucket(cache_dir):
    kernel = _kernel()
    _tune(kernel, FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}), x=tf.ones([64, 64]))
    files = list(cache_dir.glob("tuning-*.json"))
    assert [f.name for f in files] == [f"tuning-{platform.fingerprint_id()}.json"]
    data = json.loads(files[0].read_text())
    assert data["fingerprint"] == platform.fingerprint()
    tuning.reset()  # a new process: read from disk
    for shape in ([64, 64], [60, 70], [256, 256]):
        choice = tuning.choice_for(kernel, (tf.ones(shape),), {}, platform=dispatch.cpu_platform(), dtype=tf.float32)
        assert choice == ("xla", None), shape
    selection = kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(tf.ones([64, 64]),))
    assert (selection.implementation, selection.source) == ("xla", "tuned")
    assert selection.describe() == "xla, tuned"
    # other options are another signature: the table decides
    selection = kernel.select(
        None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(tf.ones([64, 64]),), refuse_xla=False
    )
    assert (selection.implementation, selection.source) == ("graph", "table")


def test_forward_and_forward_backward_are_separate_signatures():
    kernel = _kernel()
    _tune(kernel, FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}))
    x = tf.ones([4, 4])
    assert kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,)).source == "tuned"
    with tf.GradientTape():
        selection = kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,))
    assert selection.source == "table"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"records": []}), json.dumps([1, 2])])
def test_a_corrupt_cache_warns_once_and_auto_keeps_the_table(cache_dir, content):
    cache_dir.mkdir()
    (cache_dir / f"tuning-{platform.fingerprint_id()}.json").write_text(content)
    kernel = _kernel()
    x = tf.ones([4, 4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert kernel(x).numpy().tolist() == (2 * x).numpy().tolist()
            assert tuning.choice_for(kernel, (x,), {}, platform="cpu", dtype=tf.float32) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "could not read its tuning cache" in messages[0]


def test_a_corrupt_cache_is_replaced_by_the_next_write(cache_dir):
    cache_dir.mkdir()
    path = cache_dir / f"tuning-{platform.fingerprint_id()}.json"
    path.write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tune(_kernel(), FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}))
    assert len(json.loads(path.read_text())["records"]) == 1


def test_a_read_only_cache_warns_once_and_keeps_the_record_in_memory(cache_dir, monkeypatch):
    cache_dir.mkdir()
    cache_dir.chmod(0o500)

    def read_only(*args, **kwargs):
        # What creating a file in a read-only directory raises (root ignores the mode).
        raise PermissionError(13, "Permission denied", str(cache_dir))

    monkeypatch.setattr(tuning.tempfile, "mkstemp", read_only)
    try:
        kernel = _kernel()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _tune(kernel, FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}))
            _tune(kernel, FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}), x=tf.ones([9, 9]))
            assert kernel(tf.ones([4, 4])).numpy().sum() == 32.0
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "could not write its tuning cache" in messages[0]
        assert tuning.choice_for(kernel, (tf.ones([4, 4]),), {}, platform=dispatch.cpu_platform(), dtype=tf.float32)
        assert not list(cache_dir.iterdir()) or all(p.suffix == ".lock" for p in cache_dir.iterdir())
    finally:
        cache_dir.chmod(0o700)


def test_an_unwritable_cache_path_warns_once(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(blocker / "cache"))  # a directory under a file
    tuning.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = _tune(_kernel(), FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}))
    assert record["implementation"] == "xla"
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1


def test_two_processes_writing_at_once_lose_nothing(cache_dir):
    script = textwrap.dedent(
        """
        import sys
        from fastlayers.kernels import tuning
        store = tuning.Cache(sys.argv[1], facts={"machine": "test"})
        for i in range(40):
            key = tuning.Key("k", "float32", "cpu", sys.argv[2], (i,))
            assert store.store(key, {"implementation": "graph", "variant": None, "writer": sys.argv[2]})
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(cache_dir), name], env=env)
        for name in ("first", "second")
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    store = tuning.Cache(str(cache_dir), facts={"machine": "test"})
    writers = [json.loads(text)[3] for text in store.records()]
    assert sorted(writers) == ["first"] * 40 + ["second"] * 40
    assert not [p for p in os.listdir(cache_dir) if p.startswith(".tuning-")]  # no temporary left


def test_a_changed_fingerprint_retunes(cache_dir, monkeypatch):
    kernel = _kernel()
    _tune(kernel, FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0}))
    x = tf.ones([4, 4])
    assert tuning.choice_for(kernel, (x,), {}, platform=dispatch.cpu_platform(), dtype=tf.float32)
    other = {**platform.fingerprint(), "tensorflow": "0.0.0"}
    monkeypatch.setattr(platform, "fingerprint", lambda: other)
    tuning.reset()
    assert tuning.choice_for(kernel, (x,), {}, platform=dispatch.cpu_platform(), dtype=tf.float32) is None
    assert len(list(cache_dir.glob("tuning-*.json"))) == 1  # the other machine's file is left alone
    # a file holding another fingerprint under this one's name is not trusted either
    path = cache_dir / f"tuning-{platform.fingerprint_id(other)}.json"
    mine = next(cache_dir.glob("tuning-*.json"))
    path.write_text(mine.read_text())
    tuning.reset()
    with pytest.warns(RuntimeWarning, match="another machine"):
        assert tuning.choice_for(kernel, (x,), {}, platform=dispatch.cpu_platform(), dtype=tf.float32) is None


def test_a_tuned_choice_that_stops_being_supported_falls_back_by_the_table():
    kernel = _kernel()
    x = tf.ones([4, 4])
    tuning.tune(kernel, (x,), {"refuse_xla": False}, budget=100.0,
                clock=(clock := FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0})), run=clock.run)
    record = tuning.cache().lookup(tuning.make_key(kernel, (x,), {"refuse_xla": False}, platform=dispatch.cpu_platform(), dtype=tf.float32))
    assert record["implementation"] == "xla"
    # the same signature, as stored, but the kernel now refuses XLA for it
    refusing = dispatch.Kernel(
        "tuned_double",
        _double,
        auto={(dispatch.cpu_platform(), "*"): ("graph", "xla", "reference")},
        not_supported_reasons=lambda implementation, **_: ["no longer"] if implementation == "xla" else [],
    )
    selection = refusing.select(
        None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,), refuse_xla=False
    )
    assert (selection.implementation, selection.source) == ("graph", "table")


def test_a_tuned_variant_reaches_the_compiled_function():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Scale:
        factor: int = 2

        @property
        def label(self):
            return f"x{self.factor}"

    seen = []

    def compiled(x, *, selection):
        seen.append(selection.variant)
        return x * selection.variant.factor / selection.variant.factor * 2

    kernel = dispatch.Kernel(
        "variant_double",
        _double,
        compiled,
        auto={(dispatch.cpu_platform(), "*"): ("graph", "reference")},
        variants=lambda implementation, **_: (Scale(2), Scale(4)),
    )
    labels = [c.label for c in kernel.tuning_candidates(platform=dispatch.cpu_platform(), dtype=tf.float32)]
    # each implementation's default first, then the other variants
    assert labels == ["graph x2", "reference x2", "xla x2", "graph x4", "reference x4", "xla x4"]
    clock = FakeClock({label: 1.0 for label in labels} | {"graph x4": 0.5})
    _tune(kernel, clock)
    x = tf.ones([4, 4])
    assert kernel(x).numpy().tolist() == (2 * x).numpy().tolist()
    assert seen[-1] == Scale(4)
    assert kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,)).describe() == (
        "graph x4, tuned"
    )


def test_autotune_tunes_a_new_signature_on_its_first_call(cache_dir, monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(tuning.BUDGET_ENV, "60")  # room for every compile; tiny calls end sooner
    kernel = _kernel("autotuned_double")
    x = tf.ones([3, 5])
    assert kernel(x).numpy().tolist() == (2 * x).numpy().tolist()
    [path] = cache_dir.glob("tuning-*.json")
    [record] = json.loads(path.read_text())["records"].values()
    assert record["kernel"] == "autotuned_double"
    assert set(record["seconds"]) == {"graph", "xla", "reference"}
    selection = kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,))
    assert selection.source == "tuned"
    # inside a tf.function the choice is made when tracing: a new shape is tuned from
    # sample inputs of its shape
    y = tf.function(lambda t: kernel(t))(tf.ones([7, 2]))
    assert y.numpy().tolist() == [[2.0, 2.0]] * 7
    assert len(json.loads(path.read_text())["records"]) == 2


def test_autotune_is_off_by_default(cache_dir):
    _kernel("untuned_double")(tf.ones([3, 5]))
    assert not cache_dir.exists()


def test_compiled_layers_are_tuned_like_kernels():
    import keras

    from fastlayers import layers

    class Doubler(layers.CompiledLayer, package="fastlayers_tuning_tests"):
        def call(self, x):
            return 2 * x

    layer = Doubler()
    x = tf.ones([4, 4])
    layer(x)
    kernel = next(iter(layer._fastlayers_kernels.values()))
    clock = FakeClock({"graph": 3.0, "xla": 1.0, "reference": 5.0})
    tuning.tune(kernel, (x,), {}, budget=10.0, clock=clock, run=clock.run)
    assert kernel.select(None, platform=dispatch.cpu_platform(), dtype=tf.float32, tensors=(x,)).implementation == "xla"
    assert keras.ops.convert_to_numpy(layer(x)).tolist() == (2 * x).numpy().tolist()


def test_recording_collects_the_auto_calls_a_model_makes():
    from fastlayers import kernels

    x = tf.ones([64, 256])
    with dispatch.recording() as calls:
        kernels.dense(x, tf.ones([256, 512]))
        kernels.dense(x, tf.ones([256, 512]), implementation="graph")  # explicit: nothing to tune
        kernels.exponential(x)
    assert [call.kernel.name for call in calls] == ["dense", "exponential"]
    assert calls[0].tensors[0] is x and calls[0].dtype == tf.float32
    with dispatch.recording() as later:
        pass
    assert later == [] and len(calls) == 2


def test_compiled_layers_of_other_widths_are_other_signatures():
    from fastlayers import layers

    class Widen(layers.CompiledLayer, package="fastlayers_tuning_tests"):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units))

        def call(self, x):
            return x @ self.w

    x = tf.ones([4, 8])
    keys = []
    for units in (16, 32):
        layer = Widen(units)
        with dispatch.recording() as calls:
            layer(x)
        [call] = calls
        keys.append(tuning.make_key(call.kernel, call.tensors, call.options, platform="cpu", dtype=tf.float32))
    assert keys[0].kernel == keys[1].kernel == "widen" and keys[0] != keys[1]


def test_warm_ups_stop_when_the_budget_is_spent():
    clock = FakeClock({"graph": 4.0, "xla": 4.0, "reference": 4.0})
    record = _tune(_kernel(), clock, budget=6.0)
    assert set(record["seconds"]) == {"graph", "xla"}  # the third was never reached
    assert clock.calls["reference"] == 0


def test_a_tuning_that_fails_warns_once_and_the_call_still_runs(monkeypatch):
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(tuning, "_TUNING_FAILED", [])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tuning, "tune", broken)
    kernel = _kernel("failing_double")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in ([2], [3], [4]):
            assert kernel(tf.ones(shape)).numpy().tolist() == [2.0] * shape[0]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["fastlayers could not tune a call of kernel 'failing_double' (out of memory); "
                        "auto uses the shipped table where it has no tuned choice."]


def _variant_kernel(name):
    """A kernel whose graph and xla paths have three variants each (a tile size)."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Tile:
        size: int

    def variants(implementation, **_):
        return () if implementation == "reference" else (Tile(1), Tile(2), Tile(3))

    return _kernel(name, variants=variants)


def test_only_the_variants_of_implementations_near_the_fastest_are_tried():
    kernel = _variant_kernel("tiled_double")
    labels = [c.label for c in kernel.tuning_candidates(platform=dispatch.cpu_platform(), dtype=tf.float32)]
    graph, xla = [label for label in labels if label.startswith("graph")], [label for label in labels if label.startswith("xla")]
    assert len(graph) == len(xla) == 3
    costs = {label: 1.0 for label in labels}
    costs.update({xla[0]: 3.0, graph[1]: 0.8, xla[1]: 0.1})  # xla's default is 3x the fastest
    clock = FakeClock(costs)
    record = _tune(kernel, clock, budget=1e9)
    assert all(clock.calls[label] == 0 for label in xla[1:])  # never tried, however fast
    # Over twice the fastest default at its screening call: out before the rounds
    # (round one would drop it by the same margin), after its warm-up and that call.
    assert clock.calls[xla[0]] == 2
    assert record["seconds"][xla[0]] == 3.0  # that call, for the record
    assert record["label"] == graph[1]


def test_a_default_within_the_first_rounds_margin_races_without_its_variants():
    kernel = _variant_kernel("tiled_double_near")
    labels = [c.label for c in kernel.tuning_candidates(platform=dispatch.cpu_platform(), dtype=tf.float32)]
    graph, xla = [label for label in labels if label.startswith("graph")], [label for label in labels if label.startswith("xla")]
    costs = {label: 1.0 for label in labels}
    costs.update({xla[0]: 1.8})  # past the variants' screen (1.5x), within round one's (2x)
    clock = FakeClock(costs)
    record = _tune(kernel, clock, budget=1e9)
    assert all(clock.calls[label] == 0 for label in xla[1:])
    # Warm-up, the screening call, and two rounds: out once it lost both by more than a tie.
    assert clock.calls[xla[0]] == 4
    assert record["label"] == graph[0]
