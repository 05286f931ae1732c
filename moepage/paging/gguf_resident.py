"""A resident GGUF: every metadata key and every tensor but the routed experts of a GGUF, bytes copied as stored
(`moepage split` of a GGUF writes one; so does `serve --lazy` of a GGUF on the Hub, from range reads)."""
from __future__ import annotations

import numpy as np


def write_resident_gguf(src, out_path: str, skip: set[str]):
    """A GGUF with all of src's metadata and all tensors not in `skip`, each tensor's bytes copied as stored.
    src: a GGUFFile, or anything with its architecture, metadata, field_types, tensors and read_bytes."""
    import gguf

    writer = gguf.GGUFWriter(out_path, src.architecture)
    try:
        for name, value in src.metadata.items():
            if name in ("general.architecture", "general.alignment"):
                continue
            kind, sub = src.field_types[name]
            writer.add_key_value(name, value, gguf.GGUFValueType(kind),
                                 sub_type=gguf.GGUFValueType(sub) if sub is not None else None)
        for name, info in src.tensors.items():
            if name in skip:
                continue
            raw = np.frombuffer(src.read_bytes(info.start, info.nbytes), dtype=np.uint8)
            byte_shape = (*info.shape[:-1], info.type.row_bytes(info.shape[-1])) if info.shape else (info.nbytes,)
            writer.add_tensor(name, raw.reshape(byte_shape), raw_shape=byte_shape,
                              raw_dtype=gguf.GGMLQuantizationType(info.type.id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
