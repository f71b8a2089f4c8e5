"""Reading the programs TensorFlow actually runs: grappler's graph and XLA's HLO."""

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
from tensorflow.python.grappler import tf_optimizer


def grappler_ops(fn, *specs, device="/job:localhost/replica:0/task:0/device:CPU:0"):
    """``(op type, fused ops)`` of each node grappler leaves in ``tf.function(fn)``."""
    concrete = tf.function(fn).get_concrete_function(*specs)
    meta = tf.compat.v1.train.export_meta_graph(
        graph_def=concrete.graph.as_graph_def(), graph=concrete.graph
    )
    for node in meta.graph_def.node:  # the remapper only fuses ops placed on a device
        node.device = device
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(t.name for t in concrete.outputs)
    meta.collection_def["train_op"].CopyFrom(fetch)
    optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta)
    return [
        (node.op, tuple(s.decode() for s in node.attr["fused_ops"].list.s))
        for node in optimized.node
        if node.op not in ("Placeholder", "Identity", "NoOp", "Const")
    ]


def xla_hlo(fn, *args, stage="optimized_hlo"):
    """The HLO text XLA compiles ``fn`` to for these arguments."""
    return tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(stage=stage)
