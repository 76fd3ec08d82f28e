"""A stage script with every training batch recorded, for tests under torchrun:
`torchrun ... tests/record_batches.py OUT_DIR SCRIPT ARGS` writes OUT_DIR/rank<RANK>.json, the unpadded token ids of
each sequence the rank trained on, in order."""

import atexit
import json
import os
import runpy
import sys

from transformers import Trainer


def training_step_spy(seen, original=Trainer.training_step):
    """A Trainer.training_step that appends each row's unpadded token ids to `seen`, then trains as `original`."""

    def spy(self, model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        for row in range(ids.shape[0]):
            seen.append(ids[row][mask[row].bool()].tolist() if mask is not None else ids[row].tolist())
        return original(self, model, inputs, *args, **kwargs)

    return spy


if __name__ == "__main__":
    out_dir, script = sys.argv[1], sys.argv[2]
    seen = []
    Trainer.training_step = training_step_spy(seen)
    path = os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json")
    atexit.register(lambda: json.dump(seen, open(path, "w")))
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
