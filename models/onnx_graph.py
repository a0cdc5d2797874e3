#!/usr/bin/env python3
"""Builds the ONNX graphs of all-MiniLM-L6-v2 from the model's own f32 weights.

    python3 onnx_graph.py MODEL_DIR OUT_DIR

reads MODEL_DIR/config.json and MODEL_DIR/model.safetensors and writes
OUT_DIR/model.onnx (f32, the exact weights, standard ONNX ops only) and
OUT_DIR/model_int8.onnx (8-bit weights, ONNX Runtime contrib ops). No torch,
no transformers: the safetensors file is read directly (8-byte little-endian
header length, a JSON header, then raw little-endian tensors) and the BERT
encoder is written with the onnx helper API.

Graph inputs: input_ids, attention_mask, token_type_ids, all int64
[batch, sequence]. Output: last_hidden_state, float32 [batch, sequence, 384],
the token embeddings before pooling (mean pooling and L2 normalisation happen
in the caller). Needs the packages pinned in requirements-fetch.txt.
"""

import json
import logging
import math
import os
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization is a standard op from 17 on
INT8_BLOCK = 32  # MatMulNBits block size for model_int8.onnx
DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path):
    """Returns {name: numpy array} for every tensor in a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        array = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        tensors[name] = array.reshape(info["shape"]).astype(dtype.newbyteorder("="))
    return tensors


def check_config(config):
    expected = {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "vocab_size": 30522,
        "position_embedding_type": "absolute",
    }
    for key, value in expected.items():
        if config.get(key) != value:
            raise SystemExit(f"onnx_graph: config.json has {key}={config.get(key)!r}, this script builds {value!r}")


class Graph:
    def __init__(self, weights):
        self.weights = weights
        self.nodes = []
        self.initializers = []
        self.count = 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint, array):
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, key, transpose=False):
        array = self.weights[key]
        if array.dtype != np.float32:
            raise SystemExit(f"onnx_graph: {key} is {array.dtype}, expected float32")
        if transpose:
            array = array.T
        name = key
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x, prefix):
        # MatMul by the transposed torch weight, then the bias: the pattern ORT's optimiser fuses.
        y = self.op("MatMul", [x, self.weight(prefix + ".weight", transpose=True)], prefix + ".matmul")
        return self.op("Add", [self.weight(prefix + ".bias"), y], prefix + ".add")

    def layer_norm(self, x, prefix, eps):
        return self.op(
            "LayerNormalization",
            [x, self.weight(prefix + ".weight"), self.weight(prefix + ".bias")],
            prefix,
            axis=-1,
            epsilon=eps,
        )


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    check_config(config)
    return config


def build(model_dir, config):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = config["layer_norm_eps"]

    weights = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    g = Graph(weights)

    # Embeddings: word + position + token type, then LayerNorm.
    words = g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), "input_ids"], "word_embeddings", axis=0)
    seq_len = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    positions = g.op(
        "Slice",
        [g.weight("embeddings.position_embeddings.weight"), g.const("zero", np.array([0], np.int64)), seq_len,
         g.const("axis0", np.array([0], np.int64))],
        "position_embeddings",
    )
    types = g.op("Gather", [g.weight("embeddings.token_type_embeddings.weight"), "token_type_ids"], "token_type_embeddings", axis=0)
    x = g.op("Add", [g.op("Add", [words, positions], "embed_add"), types], "embed_add")
    x = g.layer_norm(x, "embeddings.LayerNorm", eps)

    one = g.const("one", np.array(1.0, np.float32))
    # Additive attention mask, [batch, 1, 1, sequence]: 0 where attended, -10000 at padding.
    mask = g.op("Unsqueeze", ["attention_mask", g.const("axes1", np.array([1], np.int64))], "mask_unsqueeze")
    mask = g.op("Unsqueeze", [mask, g.const("axes2", np.array([2], np.int64))], "mask_unsqueeze")
    mask = g.op("Cast", [mask], "mask_cast", to=TensorProto.FLOAT)
    mask = g.op("Sub", [one, mask], "mask_sub")
    mask = g.op("Mul", [mask, g.const("neg", np.array(-10000.0, np.float32))], "mask_mul")

    split_shape = g.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
    scale = g.const("sqrt_head_dim", np.array(math.sqrt(head_dim), np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    half = g.const("half", np.array(0.5, np.float32))

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q = g.op("Reshape", [g.linear(x, p + ".attention.self.query"), split_shape], p + ".q_reshape")
        q = g.op("Transpose", [q], p + ".q_transpose", perm=[0, 2, 1, 3])
        k = g.op("Reshape", [g.linear(x, p + ".attention.self.key"), split_shape], p + ".k_reshape")
        k = g.op("Transpose", [k], p + ".k_transpose", perm=[0, 2, 3, 1])
        v = g.op("Reshape", [g.linear(x, p + ".attention.self.value"), split_shape], p + ".v_reshape")
        v = g.op("Transpose", [v], p + ".v_transpose", perm=[0, 2, 1, 3])
        scores = g.op("MatMul", [q, k], p + ".qk")
        scores = g.op("Div", [scores, scale], p + ".qk_scale")
        scores = g.op("Add", [scores, mask], p + ".qk_mask")
        probs = g.op("Softmax", [scores], p + ".softmax", axis=-1)
        context = g.op("MatMul", [probs, v], p + ".context")
        context = g.op("Transpose", [context], p + ".context_transpose", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_shape], p + ".context_reshape")
        attn = g.linear(context, p + ".attention.output.dense")
        x = g.layer_norm(g.op("Add", [attn, x], p + ".attention_residual"), p + ".attention.output.LayerNorm", eps)

        h = g.linear(x, p + ".intermediate.dense")
        # Exact (erf) GELU: 0.5 * h * (1 + erf(h / sqrt(2))).
        gelu = g.op("Erf", [g.op("Div", [h, sqrt2], p + ".gelu_div")], p + ".gelu_erf")
        gelu = g.op("Add", [gelu, one], p + ".gelu_add")
        gelu = g.op("Mul", [h, gelu], p + ".gelu_mul")
        gelu = g.op("Mul", [gelu, half], p + ".gelu_half")
        out = g.linear(gelu, p + ".output.dense")
        x = g.layer_norm(g.op("Add", [out, x], p + ".output_residual"), p + ".output.LayerNorm", eps)

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))

    ids = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="semcache models/onnx_graph.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize(f32_path, int8_path):
    """The int8 graph: every weight MatMul (Q, K, V, attention output, both
    feed-forward layers; 36 in all) becomes a MatMulNBits with symmetric int8
    weights in blocks of INT8_BLOCK along the input dimension, accuracy_level 4.

    At that level ONNX Runtime quantises the activations to int8 per row and
    block at run time, so a prompt's vector does not depend on what it is
    batched with. quantize_dynamic (MatMulInteger / DynamicQuantizeLinear)
    was faster on batches but scales the whole batch tensor at once: the same
    text alone and in a batch came out at cosine 0.977, and its vectors were
    further from the f32 ones (min cosine 0.960 on 1000 prompts, against
    0.998 here). The attention arithmetic stays f32.

    The word-embedding table (30522 x 384, 47 MB in f32, most of the graph)
    is stored as int8 rows with one f32 scale per row (symmetric, absmax),
    gathered and scaled back: Cast(Gather(rows, ids)) * Gather(scales, ids).
    ONNX Runtime's block quantiser takes Gather only at 4 bits. The result
    runs on ONNX Runtime only (com.microsoft.MatMulNBits).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every node at INFO
    quantizer = MatMulNBitsQuantizer(
        onnx.load(f32_path),
        bits=8,
        block_size=INT8_BLOCK,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    model = quantizer.model.model
    quantized = sum(node.op_type == "MatMulNBits" for node in model.graph.node)
    if quantized != 36:
        raise SystemExit(f"onnx_graph: expected 36 MatMulNBits in the int8 graph, got {quantized}")
    quantize_word_embeddings(model)
    onnx.checker.check_model(model, full_check=True)
    save(model, int8_path)


def quantize_word_embeddings(model):
    g = model.graph
    key = "embeddings.word_embeddings.weight"
    table = next(i for i in g.initializer if i.name == key)
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[0] == key)
    weights = numpy_helper.to_array(table).astype(np.float32)
    scales = np.abs(weights).max(axis=1, keepdims=True) / 127.0
    scales[scales == 0] = 1.0
    rows = np.clip(np.round(weights / scales), -127, 127).astype(np.int8)
    g.initializer.remove(table)
    g.initializer.extend(
        [numpy_helper.from_array(rows, key + ".int8"), numpy_helper.from_array(scales.astype(np.float32), key + ".scale")]
    )
    ids, out = gather.input[1], gather.output[0]
    at = list(g.node).index(gather)
    g.node.remove(gather)
    replacement = [
        helper.make_node("Gather", [key + ".int8", ids], ["word_embeddings_int8"], name="word_embeddings_int8", axis=0),
        helper.make_node("Cast", ["word_embeddings_int8"], ["word_embeddings_cast"], name="word_embeddings_cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [key + ".scale", ids], ["word_embeddings_scale"], name="word_embeddings_scale", axis=0),
        helper.make_node("Mul", ["word_embeddings_cast", "word_embeddings_scale"], [out], name="word_embeddings_rescale"),
    ]
    for offset, node in enumerate(replacement):
        g.node.insert(at + offset, node)


def save(model, path):
    """Writes the graph to `path` and its weights to `path`.data beside it (ONNX external
    data). ONNX Runtime maps that file into memory rather than copying the weights onto the
    heap, so the sessions semcache opens share one copy of every weight they do not repack
    (the word-embedding table above all, whose pages are read only for the tokens that occur),
    and the graph itself is a few dozen KB to parse."""
    data = os.path.basename(path) + ".data"
    if os.path.exists(os.path.join(os.path.dirname(path), data)):
        os.remove(os.path.join(os.path.dirname(path), data))  # onnx appends to an existing file
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: onnx_graph.py MODEL_DIR OUT_DIR")
    model_dir, out_dir = sys.argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    f32_path = os.path.join(out_dir, "model.onnx")
    int8_path = os.path.join(out_dir, "model_int8.onnx")
    config = load_config(model_dir)
    save(build(model_dir, config), f32_path)
    quantize(f32_path, int8_path)


if __name__ == "__main__":
    main()
