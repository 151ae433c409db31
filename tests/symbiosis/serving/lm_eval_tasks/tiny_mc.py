"""The dataset of the ``symbiosis_tiny_mc`` task: ``tiny_mc.jsonl`` beside this file, loaded by ``datasets``."""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("tiny_mc.jsonl"))})
