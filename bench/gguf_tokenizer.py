"""The embedded model's tokenizer, copied into a GGUF that bench/ writes (bench/dense_cpu.py,
bench/moe_cpu.py): their random models speak SmolLM2's vocabulary."""
from __future__ import annotations


def copy_tokenizer(source, writer) -> None:
    """Every `tokenizer.*` field of the GGUFReader `source` into the GGUFWriter `writer`."""
    from gguf import GGUFValueType

    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            if field.types[0] == GGUFValueType.ARRAY:
                writer.add_array(key, field.contents())
            else:
                writer.add_key_value(key, field.contents(), field.types[0])
