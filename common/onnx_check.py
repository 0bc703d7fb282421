"""What an edge checks in an ONNX head before ONNX Runtime ever sees it, without the ``onnx``
package (an edge installs only ``onnxruntime``): the serialized ``ModelProto`` is read with a
small protobuf wire-format reader, and the graph is refused unless

- it is at most ``MAX_HEAD_BYTES`` and ``MAX_ONNX_NODES`` operators;
- it imports only the standard operator set and every node is one of :data:`ALLOWED_OPS` of it
  (no custom domains, no model-local functions, no subgraphs);
- every tensor holds its data inline (no external data files);
- its one input ``input`` and its outputs ``layer{i}`` have exactly the shapes the job announces,
  with a free batch axis.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from common import constants as C
from common.errors import ProtocolError
from common.protocol import FeatureLayout

# Operators of the standard domain a head may use: convolutions, pooling, pointwise activations and
# arithmetic, and the shape plumbing of a routed model (what LeNet and YOLOv5 heads export to).
ALLOWED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv", "Div", "Flatten", "Gemm",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape",
    "Resize", "Sigmoid", "Slice", "Split", "Sub", "Tanh", "Transpose",
})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Field numbers of onnx.proto3.
MODEL_OPSET, MODEL_GRAPH, MODEL_FUNCTIONS = 8, 7, 25
OPSET_DOMAIN = 1
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 4, 5, 7
ATTR_TENSOR, ATTR_GRAPH, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
VALUE_NAME, VALUE_TYPE, TYPE_TENSOR, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_VALUE = 1, 2, 1, 2, 1, 1

Field = tuple[int, int | bytes]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtocolError("ONNX head: truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def fields(buf: bytes) -> Iterator[Field]:
    """(field number, value) of a protobuf message: an int for varints, bytes for length-delimited
    fields (fixed-width ones are skipped: nothing checked here is one)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ProtocolError("ONNX head: a field runs past the end of its message")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ProtocolError(f"ONNX head: unsupported protobuf wire type {wire}")
    if pos != len(buf):
        raise ProtocolError("ONNX head: truncated message")


def _messages(buf: bytes, number: int) -> list[bytes]:
    return [v for n, v in fields(buf) if n == number and isinstance(v, bytes)]


def _text(buf: bytes, number: int) -> str:
    found = _messages(buf, number)
    return found[-1].decode("utf-8", "replace") if found else ""


def _check_tensor(tensor: bytes, where: str) -> None:
    for n, v in fields(tensor):
        if (n == TENSOR_DATA_LOCATION and v == EXTERNAL) or n == TENSOR_EXTERNAL_DATA:
            raise ProtocolError(f"ONNX head: {where} refers to external data; its weights must be inside the graph")


def _check_node(node: bytes) -> None:
    op, domain = _text(node, NODE_OP_TYPE), _text(node, NODE_DOMAIN)
    if domain not in STANDARD_DOMAINS:
        raise ProtocolError(f"ONNX head: operator {op!r} of custom domain {domain!r} is not allowed")
    if op not in ALLOWED_OPS:
        raise ProtocolError(f"ONNX head: operator {op!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_OPS))})")
    for attribute in _messages(node, NODE_ATTRIBUTE):
        for n, v in fields(attribute):
            if n in (ATTR_GRAPH, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES):
                raise ProtocolError(f"ONNX head: operator {op!r} carries a subgraph or sparse tensor")
            if n in (ATTR_TENSOR, ATTR_TENSORS) and isinstance(v, bytes):
                _check_tensor(v, f"a constant of {op!r}")


def _shape(value_info: bytes) -> list[int | None]:
    """Dimensions of a tensor value; None for a symbolic or unknown one."""
    dims: list[int | None] = []
    for tensor_type in (t for typ in _messages(value_info, VALUE_TYPE) for t in _messages(typ, TYPE_TENSOR)):
        for shape in _messages(tensor_type, TENSOR_TYPE_SHAPE):
            for dim in _messages(shape, SHAPE_DIM):
                values = [v for n, v in fields(dim) if n == DIM_VALUE and isinstance(v, int)]
                dims.append(values[0] if values else None)
    return dims


def _check_io(graph: bytes, input_shape: Sequence[int], outputs: Sequence[FeatureLayout]) -> None:
    initializers = {_text(t, VALUE_NAME) for t in _messages(graph, GRAPH_INITIALIZER)}
    inputs = {_text(v, VALUE_NAME): _shape(v) for v in _messages(graph, GRAPH_INPUT)}
    inputs = {name: shape for name, shape in inputs.items() if name not in initializers}
    wanted_in = {"input": [None, *input_shape]}
    if inputs != wanted_in:
        raise ProtocolError(f"ONNX head: inputs {inputs} differ from the job's {wanted_in}")
    got_out = [(_text(v, VALUE_NAME), _shape(v)) for v in _messages(graph, GRAPH_OUTPUT)]
    wanted_out = [(f"layer{f.layer}", [None, *f.shape]) for f in outputs]
    if got_out != wanted_out:
        raise ProtocolError(f"ONNX head: outputs {got_out} differ from the job's {wanted_out}")


def check_onnx_head(blob: bytes, input_shape: Sequence[int], outputs: Sequence[FeatureLayout]) -> None:
    """ProtocolError naming the first problem unless ``blob`` is a head this edge may run."""
    if len(blob) > C.MAX_HEAD_BYTES:
        raise ProtocolError(f"ONNX head: {len(blob)} bytes, more than {C.MAX_HEAD_BYTES}")
    if _messages(blob, MODEL_FUNCTIONS):
        raise ProtocolError("ONNX head: model-local functions are not allowed")
    for opset in _messages(blob, MODEL_OPSET):
        if (domain := _text(opset, OPSET_DOMAIN)) not in STANDARD_DOMAINS:
            raise ProtocolError(f"ONNX head: custom operator set {domain!r} is not allowed")
    graphs = _messages(blob, MODEL_GRAPH)
    if len(graphs) != 1:
        raise ProtocolError(f"ONNX head: {len(graphs)} graphs, expected one (is it an ONNX model?)")
    graph = graphs[0]
    nodes = _messages(graph, GRAPH_NODE)
    if len(nodes) > C.MAX_ONNX_NODES:
        raise ProtocolError(f"ONNX head: {len(nodes)} operators, more than {C.MAX_ONNX_NODES}")
    if _messages(graph, GRAPH_SPARSE_INITIALIZER):
        raise ProtocolError("ONNX head: sparse initializers are not allowed")
    for node in nodes:
        _check_node(node)
    for tensor in _messages(graph, GRAPH_INITIALIZER):
        _check_tensor(tensor, f"initializer {_text(tensor, VALUE_NAME)!r}")
    _check_io(graph, input_shape, outputs)
