"""Benchmark cases, declared once as data and run by both the pytest suites and the CLI.

A :class:`Suite` is declared the way Triton declares its benchmarks: an x axis
(``size``), the providers drawn as one line each, and an analytic FLOP count from
``fastlayers.bench.flops`` that turns seconds into GFLOP/s. A provider is a
function that builds one eager step (inputs, weights, the call) for a shape and a
Keras dtype policy; the runner wraps it in a ``tf.function`` for the ``function``
mode and places it on the device. Adding a suite is adding data to ``SUITES``.

Every built-in suite has two kinds of special providers: the **peak** row (a bare
``tf.matmul``: what this machine's matmul library reaches; the others are a
fraction of it, or of a row that beats it, ``report.peak_gflops``) and the **baseline** rows (the Keras built-in, against which
speed-ups are quoted; with several, such as Keras's attention with and without XLA,
the fastest of them in each group). A provider that computes another problem than
its suite's, like the attention suites' peak row (a square matmul), brings its own
FLOP count. :func:`layer_suite` declares the suite of any one layer
(``fastlayers bench --layer``): its baseline is the layer's reference
implementation, it has no peak row, and its FLOPs are counted by TensorFlow's op
counter on a traced call.

Shape letters: input ``x [M, K]``, kernel ``[K, N]``; attention batch ``B``, query
length ``T``, key length ``S``, heads ``N``, head dim ``H``. For the dense suite
``size`` is ``M``, the number of rows (tokens, batch items); for the matmul suite
``M = K = N = size``; for the attention suites ``T = S = size``; for a layer suite
it is the batch ``B``, the first axis of the inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf
from fastlayers.bench import flops as flops_lib
from fastlayers.bench import peers
from fastlayers.bench.layer_spec import format_shapes, random_inputs
from fastlayers.kernels import dispatch

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
# float32 and mixed_bfloat16 are what people train with on CPUs; the other
# policies stay available as parameters.
HEADLINE_POLICIES = ("float32", "mixed_bfloat16")
MODES = ("eager", "function")
DEVICES = ("cpu", "gpu")
PEAK = "peak"
BASELINE = "baseline"
AUTO = "auto"  # Provider.implementation of the line that lets fastlayers choose

Shape = Mapping[str, int]
Step = Callable[[], object]


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def tf_device(device: str) -> str:
    return {"cpu": "/CPU:0", "gpu": "/GPU:0"}[device]


def platform_for(device: str) -> str:
    """The auto-table platform (``dispatch.PLATFORMS``) of ``device`` in this process."""
    return "gpu" if device == "gpu" else dispatch.cpu_platform()


def compute_dtype(policy: str) -> tf.DType:
    return tf.as_dtype(keras.DTypePolicy(policy).compute_dtype)


@dataclasses.dataclass(frozen=True)
class Provider:
    """One line of a suite: a way to compute the suite's problem.

    Args:
        name: the name used on the command line, in results and in the plot legend.
        build: ``build(shape, policy) -> step``, a zero-argument eager callable that
            computes the problem once on inputs and weights it created. A closure,
            not a ``functools.partial``: ``tf.function`` re-converts a partial's
            bound arguments on every call, which costs more than a small matmul.
        role: ``PEAK`` (the machine's matmul library), ``BASELINE`` (the Keras
            built-in) or ``""``.
        note: optional ``note(shape, policy, device) -> str`` shown beside the name,
            e.g. the implementation auto picks.
        flops: optional ``flops(shape) -> float`` of a provider that computes another
            problem than its suite's (a peak row's matmul); None counts the suite's.
        tf_function: whether function mode wraps the step in a ``tf.function``;
            False for another framework's call, timed as it is in both modes.
        implementation: the fastlayers implementation the line runs: ``AUTO`` for
            ``implementation=None``, else the one it fixes (``"xla"``, ``"native"``);
            None for any other line. The report sets auto against the fastest
            fixed one of its group.
    """

    name: str
    build: Callable[[Shape, str], Step]
    role: str = ""
    note: Callable[[Shape, str, str], str] | None = None
    flops: Callable[[Shape], float] | None = None
    tf_function: bool = True
    implementation: str | None = None


@dataclasses.dataclass(frozen=True)
class Suite:
    """A family of cases: one problem, swept over size, drawn as one line per provider.

    Args:
        name: the suite's name (``--suite``).
        title: what is measured, for tables and plots.
        x_label: the meaning of ``size``, with its unit, for the plot's x axis.
        shape: ``shape(size) -> {letter: extent}``.
        flops: ``flops(shape) -> float``, from ``fastlayers.bench.flops``.
        label: ``label(shape) -> str`` for tables.
        providers: the lines: at most one ``PEAK`` provider, and ``BASELINE``
            providers (the speed-up is over the fastest of them in each group).
        quick_sizes: the sizes of the default quick run and the pytest suite.
        sweep_sizes: the sizes of ``--sizes sweep`` (the plot).
        headline: whether ``fastlayers bench`` with no ``--suite`` runs it.
        flop_counter: empty when ``flops`` is an analytic formula; otherwise what
            counted them (``flops.TF_OP_COUNTER``), said in the table and the JSON.
            A count of 0 means no FLOP figure: the table shows time per call.
    """

    name: str
    title: str
    x_label: str
    shape: Callable[[int], Shape]
    flops: Callable[[Shape], float]
    label: Callable[[Shape], str]
    providers: tuple[Provider, ...]
    quick_sizes: tuple[int, ...]
    sweep_sizes: tuple[int, ...]
    headline: bool = True
    flop_counter: str = ""

    def sizes_from(self, option: str | None) -> tuple[int, ...]:
        """Sizes from a ``"256,1024"`` option; the quick sizes when it is empty."""
        if not option:
            return self.quick_sizes
        return tuple(int(size) for size in option.split(","))

    def provider(self, name: str) -> Provider:
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.providers)

    @property
    def peak(self) -> Provider | None:
        """The peak provider; None when the suite has none (a layer suite)."""
        found = [p for p in self.providers if p.role == PEAK]
        if len(found) > 1:
            raise ValueError(f"suite {self.name!r} has {len(found)} {PEAK} providers")
        return found[0] if found else None

    @property
    def baselines(self) -> tuple[Provider, ...]:
        return tuple(p for p in self.providers if p.role == BASELINE)

    @property
    def baseline_text(self) -> str:
        """``keras``, or ``the fastest of keras, keras-xla``: what speed-ups are over."""
        names = [p.name for p in self.baselines]
        return names[0] if len(names) == 1 else "the fastest of " + ", ".join(names)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured point: a provider of a suite at a size, policy, mode and device."""

    suite: Suite
    size: int
    policy: str
    mode: str
    device: str
    provider: Provider

    @property
    def shape(self) -> Shape:
        return self.suite.shape(self.size)

    @property
    def flops(self) -> float:
        return (self.provider.flops or self.suite.flops)(self.shape)

    @property
    def group(self) -> tuple:
        """The cases measured together and compared with each other (all providers)."""
        return (self.suite.name, self.size, self.policy, self.mode, self.device)

    @property
    def key(self) -> tuple:
        """What identifies a case across runs (``--compare``)."""
        return self.group + (self.provider.name,)

    def with_provider(self, provider: Provider) -> Case:
        return dataclasses.replace(self, provider=provider)

    @property
    def provider_label(self) -> str:
        if self.provider.note is None:
            return self.provider.name
        note = self.provider.note(self.shape, self.policy, self.device)
        return f"{self.provider.name} ({note})"

    def build(self) -> Step:
        """The step to time: built on the device, wrapped in a tf.function in that mode.

        The step returns once the result is computed: eager CPU kernels are
        synchronous, and a GPU step waits for the device.
        """
        with tf.device(tf_device(self.device)):
            call = self.provider.build(self.shape, self.policy)
        if self.mode == "function" and self.provider.tf_function:
            call = tf.function(call)
        device = tf_device(self.device)
        wait = tf.test.experimental.sync_devices if self.device == "gpu" else None

        def step():
            with tf.device(device):
                result = call()
            if wait is not None:
                wait()
            return result

        return step


def cases(
    suite: Suite,
    sizes: Sequence[int],
    policies: Sequence[str],
    modes: Sequence[str],
    devices: Sequence[str],
    providers: Sequence[str] | None = None,
) -> list[Case]:
    """Every combination, grouped so that one group's providers are adjacent."""
    chosen = [suite.provider(name) for name in (providers or suite.provider_names)]
    return [
        Case(suite, size, policy, mode, device, provider)
        for size, policy, mode, device, provider in itertools.product(
            sizes, policies, modes, devices, chosen
        )
    ]


# --- Dense: Dense(4096, relu) on [M, 1024] -----------------------------------------

DENSE_FEATURES = 1024  # K
DENSE_UNITS = 4096  # N


def _normal(shape, policy, seed):
    return tf.cast(tf.random.stateless_normal(shape, seed=(seed, 0)), compute_dtype(policy))


def _fastlayers_dense(implementation):
    def build(shape, policy):
        from fastlayers import layers

        layer = layers.Dense(
            shape["N"], activation="relu", implementation=implementation, dtype=policy
        )
        x = _normal([shape["M"], shape["K"]], policy, 1)
        layer.build(x.shape)
        return lambda: layer(x)

    return build


def _keras_dense(shape, policy):
    layer = keras.layers.Dense(shape["N"], activation="relu", dtype=policy)
    x = _normal([shape["M"], shape["K"]], policy, 1)
    layer.build(x.shape)
    return lambda: layer(x)


def _tf_matmul(shape, policy):
    x = _normal([shape["M"], shape["K"]], policy, 1)
    w = _normal([shape["K"], shape["N"]], policy, 2)
    return lambda: tf.matmul(x, w)


def _auto_choice(kernel, tensors, policy, device, backward=False, **options):
    """``auto: graph 256x2048, tuned``: what auto runs for these inputs, and whence."""
    with tf.device(tf_device(device)):
        tensors = tuple(None if t is None else tf.zeros(t, compute_dtype(policy)) for t in tensors)
    tape = tf.GradientTape() if backward else contextlib.nullcontext()
    with tape:  # a training step's calls have their own tuning records
        selection = kernel.select(None, platform=platform_for(device), dtype=compute_dtype(policy),
                                  tensors=tensors, **options)
    return "auto: " + selection.describe()


def _dense_auto_choice(activation):
    def note(shape, policy, device):
        from fastlayers.kernels.dense import DENSE

        m, k, n = shape["M"], shape["K"], shape["N"]
        bias = [n] if activation else None
        return _auto_choice(DENSE, ([m, k], [k, n], bias), policy, device,
                            activation=keras.activations.get(activation) if activation else None)

    return note


def _dense_kernel_providers(fastlayers_build, keras_build, activation=None):
    """Auto and each implementation of a dense-kernel problem, Keras's baseline and the
    ``tf.matmul`` peak; ``fastlayers_build(implementation)`` makes a provider's build."""
    return (
        Provider("fastlayers", fastlayers_build(None), note=_dense_auto_choice(activation),
                 implementation=AUTO),
        *(
            Provider(f"fastlayers-{impl}", fastlayers_build(impl), implementation=impl)
            for impl in dispatch.IMPLEMENTATIONS
        ),
        Provider("keras", keras_build, role=BASELINE),
        Provider("tf.matmul", _tf_matmul, role=PEAK),
    )


DENSE = Suite(
    name="dense",
    title=f"Dense({DENSE_UNITS}, relu) on an [M, {DENSE_FEATURES}] input",
    x_label="rows M of the input",
    shape=lambda size: {"M": size, "K": DENSE_FEATURES, "N": DENSE_UNITS},
    # The bias and relu epilogue is O(M·N), noise beside the 2·M·K·N of the matmul.
    flops=lambda s: flops_lib.dense_flops(s["M"], s["K"], s["N"]),
    label=lambda s: f"{s['M']}x{s['K']} -> {s['N']}",
    providers=_dense_kernel_providers(_fastlayers_dense, _keras_dense, activation="relu"),
    quick_sizes=(4096,),
    sweep_sizes=(256, 512, 1024, 2048, 4096, 8192),
)



# --- int8 Dense: Dense(4096, relu) on [M, 1024], quantized as Keras quantizes it ---

def _quantized(layer, shape):
    layer.build((None, shape["K"]))
    layer.quantize("int8")
    return layer


def _fastlayers_int8_dense(implementation):
    def build(shape, policy):
        from fastlayers import layers

        layer = layers.Dense(shape["N"], activation="relu", bias_initializer="random_normal",
                             implementation=implementation, dtype=policy)
        layer = _quantized(layer, shape)
        x = _normal([shape["M"], shape["K"]], policy, 1)
        return lambda: layer(x)

    return build


def _keras_int8_dense(shape, policy):
    layer = keras.layers.Dense(shape["N"], activation="relu", bias_initializer="random_normal", dtype=policy)
    layer = _quantized(layer, shape)
    x = _normal([shape["M"], shape["K"]], policy, 1)
    return lambda: layer(x)


def _int8_auto_choice(shape, policy, device):
    from fastlayers.kernels.dense import DENSE_INT8

    m, k, n = shape["M"], shape["K"], shape["N"]
    with tf.device(tf_device(device)):
        tensors = (tf.zeros([m, k], compute_dtype(policy)), tf.zeros([k, n], tf.int8),
                   tf.zeros([n], compute_dtype(policy)), tf.zeros([n], compute_dtype(policy)))
    selection = DENSE_INT8.select(None, platform=platform_for(device), dtype=compute_dtype(policy),
                                  tensors=tensors, epsilon=keras.config.epsilon(),
                                  activation=keras.activations.relu)
    return "auto: " + selection.describe()


DENSE_INT8 = Suite(
    name="dense-int8",
    title=f"int8-quantized Dense({DENSE_UNITS}, relu) on an [M, {DENSE_FEATURES}] input",
    x_label="rows M of the input",
    shape=lambda size: {"M": size, "K": DENSE_FEATURES, "N": DENSE_UNITS},
    # Integer multiply-adds counted as FLOPs: 2·M·K·N, as the float Dense.
    flops=lambda s: flops_lib.dense_flops(s["M"], s["K"], s["N"]),
    label=lambda s: f"{s['M']}x{s['K']} -> {s['N']} int8",
    providers=(
        Provider("fastlayers", _fastlayers_int8_dense(None), note=_int8_auto_choice,
                 implementation=AUTO),
        *(
            Provider(f"fastlayers-{impl}", _fastlayers_int8_dense(impl), implementation=impl)
            for impl in (*dispatch.IMPLEMENTATIONS, dispatch.NATIVE)
        ),
        # Our float32 Dense on the same problem: the int8 path must beat it.
        Provider("fastlayers-float", _fastlayers_dense(None)),
        Provider("keras", _keras_int8_dense, role=BASELINE),
    ),
    quick_sizes=(4096,),
    sweep_sizes=(1, 16, 256, 1024, 4096),
    headline=False,
)


# --- matmul: the dense kernel alone on square [n, n]·[n, n] -------------------------

def _fastlayers_matmul(implementation):
    def build(shape, policy):
        from fastlayers import kernels

        x = _normal([shape["M"], shape["K"]], policy, 1)
        w = _normal([shape["K"], shape["N"]], policy, 2)
        return lambda: kernels.dense(x, w, implementation=implementation)

    return build


def _keras_matmul(shape, policy):
    x = _normal([shape["M"], shape["K"]], policy, 1)
    w = _normal([shape["K"], shape["N"]], policy, 2)
    return lambda: keras.ops.matmul(x, w)


MATMUL = Suite(
    name="matmul",
    title="fastlayers.kernels.dense (no bias, no activation) on [n, n]·[n, n]",
    x_label="matrix side n",
    shape=lambda size: {"M": size, "K": size, "N": size},
    flops=lambda s: flops_lib.dense_flops(s["M"], s["K"], s["N"]),
    label=lambda s: f"{s['M']}x{s['K']} @ {s['K']}x{s['N']}",
    providers=_dense_kernel_providers(_fastlayers_matmul, _keras_matmul),
    quick_sizes=(2048,),
    sweep_sizes=(256, 512, 1024, 2048, 4096),
    # The Dense suite already shows the matmul headline within the two-minute run.
    headline=False,
)


# --- attention: kernels.dot_product_attention on [B, T, N, H] with T = S = size -----

ATTENTION_BATCH = 4  # B
ATTENTION_HEADS = 8  # N
ATTENTION_HEAD_DIM = 64  # H
# The attention suites' peak row: a square tf.matmul this large reaches the matmul
# library's full rate in under half a second (one core of the 2-core Zen 3, float32
# and bfloat16: 2048 within 3% of 4096, 1024 about 10% lower).
ATTENTION_PEAK_SIDE = 2048


def _attention_inputs(shape, policy):
    b, t, s, n, h = (shape[letter] for letter in "BTSNH")
    return (_normal([b, t, n, h], policy, 1), _normal([b, s, n, h], policy, 2),
            _normal([b, s, n, h], policy, 3))


def _attention_step(attend, shape, policy, backward, jit_compile=False):
    """One forward (and backward) pass of ``attend(q, k, v)``; ``jit_compile`` compiles
    all of it with XLA, as ``model.compile(jit_compile=True)`` would."""
    q, k, v = _attention_inputs(shape, policy)
    if backward:

        def step():
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(tf.cast(attend(q, k, v), tf.float32))
            return tape.gradient(loss, [q, k, v])

    else:

        def step():
            return attend(q, k, v)

    return tf.function(step, jit_compile=True) if jit_compile else step


def _fastlayers_attention(implementation, backward):
    def build(shape, policy):
        from fastlayers import kernels

        def attend(q, k, v):
            return kernels.dot_product_attention(q, k, v, implementation=implementation)

        return _attention_step(attend, shape, policy, backward)

    return build


def _keras_attention(backward, jit_compile):
    def build(shape, policy):
        return _attention_step(keras.ops.dot_product_attention, shape, policy, backward,
                               jit_compile)

    return build


def _attention_peak(shape, policy):
    side = ATTENTION_PEAK_SIDE
    return _tf_matmul({"M": side, "K": side, "N": side}, policy)


def _attention_auto_choice(backward):
    def note(shape, policy, device):
        from fastlayers.kernels.attention import ATTENTION

        b, t, s, n, h = (shape[letter] for letter in "BTSNH")
        return _auto_choice(
            ATTENTION, ([b, t, n, h], [b, s, n, h], [b, s, n, h], None, None), policy, device,
            backward=backward, scale=1.0 / h**0.5, is_causal=False, dropout_rate=0.0, seed=None,
            block_sizes=None,
        )

    return note


def _attention_suite(backward: bool) -> Suite:
    """Self-attention shapes, ``q, k, v [B, T, N, H]``: the forward pass, or forward
    and backward (the gradient of a sum of the output with respect to q, k and v)."""
    passes = "forward and backward" if backward else "forward"
    side = ATTENTION_PEAK_SIDE
    return Suite(
        name="attention-backward" if backward else "attention",
        title=f"kernels.dot_product_attention {passes}, B={ATTENTION_BATCH}, "
        f"N={ATTENTION_HEADS}, H={ATTENTION_HEAD_DIM}",
        x_label=f"sequence length T = S (B={ATTENTION_BATCH}, N={ATTENTION_HEADS}, "
        f"H={ATTENTION_HEAD_DIM})",
        shape=lambda size: {"B": ATTENTION_BATCH, "T": size, "S": size,
                            "N": ATTENTION_HEADS, "H": ATTENTION_HEAD_DIM},
        flops=lambda s: flops_lib.attention_flops(
            s["B"], s["T"], s["S"], s["N"], s["H"], backward=backward),
        label=lambda s: f"B={s['B']} T=S={s['T']} N={s['N']} H={s['H']}",
        providers=(
            Provider("fastlayers", _fastlayers_attention(None, backward),
                     note=_attention_auto_choice(backward), implementation=AUTO),
            *(
                Provider(f"fastlayers-{impl}", _fastlayers_attention(impl, backward),
                         implementation=impl)
                for impl in dispatch.ALL_IMPLEMENTATIONS
            ),
            # keras.ops.dot_product_attention as called (eagerly or in the tf.function
            # of function mode) and under XLA: speed-ups are over the faster of the two.
            Provider("keras", _keras_attention(backward, jit_compile=False), role=BASELINE),
            Provider("keras-xla", _keras_attention(backward, jit_compile=True), role=BASELINE),
            Provider("tf.matmul", _attention_peak, role=PEAK,
                     note=lambda shape, policy, device: f"{side}x{side} @ {side}x{side}",
                     flops=lambda shape: flops_lib.dense_flops(side, side, side)),
            *(
                (Provider(peers.TORCH_SDPA, peers.torch_sdpa(backward), tf_function=False,
                          note=lambda shape, policy, device: f"{peers.torch_threads()} threads"),)
                if peers.torch_available()
                else ()
            ),
        ),
        quick_sizes=(512,),
        sweep_sizes=(256, 512, 1024, 2048, 4096),
        # Not in the two-minute default run: on one core of a busy 2-core Zen 3 the dense
        # suite's quick run took 98 s and this one's 87 s.
        headline=False,
    )


ATTENTION = _attention_suite(backward=False)
ATTENTION_BACKWARD = _attention_suite(backward=True)

SUITES: dict[str, Suite] = {
    suite.name: suite for suite in (DENSE, DENSE_INT8, MATMUL, ATTENTION, ATTENTION_BACKWARD)
}


# --- one layer: `fastlayers bench --layer` ------------------------------------------

LAYER_PROVIDERS = (AUTO, *dispatch.IMPLEMENTATIONS)


def _layer_step(spec, implementation):
    def build(shape, policy):
        shapes = spec.shapes_at(shape["B"])
        layer = spec.make(policy, implementation)
        spec.build(layer, shapes, policy)
        inputs = random_inputs(shapes, policy)
        call = spec.call
        return lambda: call(layer, inputs)

    return build


def keras_peer(cls):
    """The Keras layer a fastlayers drop-in subclasses under its own name, or None."""
    peer = getattr(keras.layers, cls.__name__, None)
    if isinstance(peer, type) and peer is not cls and issubclass(cls, peer):
        return peer
    return None


def _keras_step(spec, peer):
    def build(shape, policy):
        shapes = spec.shapes_at(shape["B"])
        layer = peer(**spec.args, dtype=policy)
        spec.build(layer, shapes, policy)
        inputs = random_inputs(shapes, policy)
        call = spec.call
        return lambda: call(layer, inputs)

    return build


def _layer_auto_choice(spec):
    choices = {}

    def note(shape, policy, device):
        key = (shape["B"], policy, device)
        if key not in choices:
            scopes = spec.scopes(spec.shapes_at(shape["B"]), policy, None, tf_device(device))
            # One kernel: its implementation; several: each as kernel/implementation.
            kernels = {scope.split("/")[1] for scope in scopes}
            named = (scope.split("/")[-1] if len(kernels) == 1 else scope.partition("/")[2]
                     for scope in scopes)
            choices[key] = ", ".join(named) or "no fastlayers kernel"
        return choices[key]

    return note


def layer_suite(spec) -> Suite:
    """The suite of one layer, from a resolved ``fastlayers.bench.layer_spec.LayerSpec``.

    A ``FastLayer`` (a ``CompiledLayer`` included) gets one provider per
    implementation, ``auto`` (with the implementation auto picks) and
    ``reference``, ``graph``, ``xla`` (and ``native`` where the class lists it in
    its ``implementations``), with the reference as the baseline, or for a drop-in
    for a Keras layer of the same name, that layer as ``keras``; any other
    Keras layer gets one provider, ``layer``, the layer as it is. ``size`` is the
    batch; the quick size is the one given, the sweep halves it three times.
    FLOPs come from TensorFlow's op counter on one traced call, counted once per size.
    """
    counts = {}

    def flops(shape):
        if shape["B"] not in counts:
            counts[shape["B"]] = spec.flops(spec.shapes_at(shape["B"]))
        return counts[shape["B"]]

    if spec.dispatches:
        # A drop-in is measured against the Keras layer it replaces; any other
        # FastLayer against its own reference. A class whose kernel has a native
        # implementation says so in its ``implementations``.
        peer = keras_peer(spec.cls)
        names = (AUTO, *getattr(spec.cls, "implementations", dispatch.IMPLEMENTATIONS))
        providers = tuple(
            Provider(
                name,
                _layer_step(spec, None if name == AUTO else name),
                role=BASELINE if name == "reference" and peer is None else "",
                note=_layer_auto_choice(spec) if name == AUTO else None,
                implementation=name,
            )
            for name in names
        )
        if peer is not None:
            providers += (Provider("keras", _keras_step(spec, peer), role=BASELINE),)
    else:
        providers = (Provider("layer", _layer_step(spec, None), role=BASELINE),)
    return Suite(
        name=spec.name,
        title=f"{spec.name}({spec.args_text()})",
        x_label="batch size (first axis of the input)",
        shape=lambda size: {"B": size},
        flops=flops,
        label=lambda s: format_shapes(spec.shapes_at(s["B"])),
        providers=providers,
        quick_sizes=(spec.batch,),
        sweep_sizes=tuple(sorted({max(1, spec.batch // 2**k) for k in range(4)})),
        headline=False,
        flop_counter=flops_lib.TF_OP_COUNTER,
    )
