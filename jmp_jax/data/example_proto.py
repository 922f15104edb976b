"""tf.train.Example and its parts as protobuf messages built here, wire-compatible with TensorFlow's.

Why not `tf.train.Example`: a training process needs only these six messages to decode its records, and
importing TensorFlow for them cost it seconds and ~0.8 GB of host memory (`import jmp_jax.training.loop` and a
jax computation: 1.1 GB peak RSS and 11.6 s with TensorFlow, 0.3 GB and 3.7 s without it and torch; one run,
on a loaded 2-core machine). Readers that want tf.data (`records.read_split`) still import TensorFlow. Field
numbers and types are those of tensorflow/core/example/feature.proto and example.proto, so the bytes are
TensorFlow's (tests/test_records.py compares them).

Messages: `Example(features=Features(feature={name: Feature(...)}))`; a `Feature` holds one of
`bytes_list=BytesList(value=[...])`, `float_list=FloatList(...)` (float32), `int64_list=Int64List(...)`.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
# A private package and pool: TensorFlow, when imported too, registers its own `tensorflow.Example`.
_PACKAGE = "jmp_jax.example"


def _field(message, name: str, number: int, kind: int, label: int = _F.LABEL_OPTIONAL, type_name: str = "",
           oneof: int | None = None, packed: bool = False) -> None:
    field = message.field.add(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if oneof is not None:
        field.oneof_index = oneof
    if packed:
        field.options.packed = True


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="jmp_jax/example.proto", package=_PACKAGE, syntax="proto3")
    for name, kind in (("BytesList", _F.TYPE_BYTES), ("FloatList", _F.TYPE_FLOAT), ("Int64List", _F.TYPE_INT64)):
        _field(proto.message_type.add(name=name), "value", 1, kind, _F.LABEL_REPEATED, packed=kind != _F.TYPE_BYTES)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate((("bytes_list", "BytesList"), ("float_list", "FloatList"),
                                                ("int64_list", "Int64List")), start=1):
        _field(feature, name, number, _F.TYPE_MESSAGE, type_name=type_name, oneof=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name="Feature")
    _field(features, "feature", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, type_name="Features.FeatureEntry")
    _field(proto.message_type.add(name="Example"), "features", 1, _F.TYPE_MESSAGE, type_name="Features")
    return proto


_CLASSES = message_factory.GetMessages([_file()], pool=descriptor_pool.DescriptorPool())

BytesList = _CLASSES[f"{_PACKAGE}.BytesList"]
FloatList = _CLASSES[f"{_PACKAGE}.FloatList"]
Int64List = _CLASSES[f"{_PACKAGE}.Int64List"]
Feature = _CLASSES[f"{_PACKAGE}.Feature"]
Features = _CLASSES[f"{_PACKAGE}.Features"]
Example = _CLASSES[f"{_PACKAGE}.Example"]
