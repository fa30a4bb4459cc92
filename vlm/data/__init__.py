"""Data: LLaVA conversation records (validate, load) and the synthetic shapes generator."""

from .records import CheckReport, check_file, conversation_to_messages, load_llava_dataset, validate_record
from .synth import COLOURS, QUADRANTS, SHAPES, SIZES, Scene, corpus_texts, generate

__all__ = [
    "COLOURS",
    "QUADRANTS",
    "SHAPES",
    "SIZES",
    "CheckReport",
    "Scene",
    "check_file",
    "conversation_to_messages",
    "corpus_texts",
    "generate",
    "load_llava_dataset",
    "validate_record",
]
