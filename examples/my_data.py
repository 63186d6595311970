"""Own data: examples/data/{notes,events}.jsonl on the tiny stories260K model, a few steps on a CPU.
For a real run, start from the default recipe instead: load_config("configs/smollm2_se.py")."""
from notellm_jax.config import Config, load_config, override


def get_config() -> Config:
    return override(load_config("configs/tiny.py"), {
        "name": "my_data", "paths.work_dir": "runs/my_data",  # everything the run writes goes here
        "data.source": "generic", "data.input_path": "examples/data",  # the folder of the two files
        "data.val_fraction": 0.2,  # a small dataset needs a larger validation share (default 0.05)
        "train.epochs": 1,  # tiny.py caps training at 64 pairs: 8 steps of 8 pairs
    })
