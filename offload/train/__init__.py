"""Training jobs: recipes, data, tokenizers and learning-rate schedules for ``offload train``.

This package loads torch and numpy; transformers is imported only where a tokenizer or a model
config is built.
"""

from offload.train.data import DataError, DataSpec, TokenStream, batches
from offload.train.recipe import ModelSpec, Recipe, TrainSpec, build_hf_config, load_recipe
from offload.train.schedule import ScheduleSpec, lr_factor, make_scheduler
from offload.train.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "DataSpec",
    "HFTokenizer",
    "ModelSpec",
    "Recipe",
    "ScheduleSpec",
    "TokenStream",
    "Tokenizer",
    "TrainSpec",
    "batches",
    "build_hf_config",
    "load_recipe",
    "load_tokenizer",
    "lr_factor",
    "make_scheduler",
]
